"""The README's results section: a table of the demo run spliced between two markers.

``--check`` compares text exactly: the demo runs on the CPU with the instruction-set pins
(pathmamba/core/cpu_pins.py), which make its numbers bitwise the same on every x86-64 CPU with AVX2, so any
difference is a real one. Where a run was not pinned (``cpu_pins: native``, a CPU without AVX2), the check
says so and points at ``compare``, which judges the means against the seeds' spread instead.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from pathmamba.core import layout
from pathmamba.core.files import atomic_write_text

#: The markers around the README's results section.
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def splice_readme(readme: Path, table_md: Path, start: str = RESULTS_START, end: str = RESULTS_END,
                  check: bool = False) -> list[str]:
    """Replace the text between the ``start`` and ``end`` markers of ``readme`` with ``table_md``'s text
    (its first heading dropped: the README has its own). With ``check``, change nothing; return the
    unified diff from the README to what it would become (empty when they agree)."""
    text = Path(readme).read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme}: expected one {start!r} followed by one {end!r}")
    body = Path(table_md).read_text()
    body = re.sub(r"\A## [^\n]*\n", "", body).lstrip("\n")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    spliced = f"{head}{start}\n{body}{end}{tail}"
    if check:
        return list(difflib.unified_diff(text.splitlines(), spliced.splitlines(), str(readme),
                                         f"{readme} with {table_md}", lineterm=""))
    atomic_write_text(readme, spliced)
    return []


def unpinned_runs(experiment_dir: Path) -> list[str]:
    """The runs under ``experiment_dir`` (their ``run.json``) whose CPU pins did not hold, as paths relative to
    it; runs recorded before the pins were recorded count as unpinned."""
    found = []
    runs = layout.RUN.format(dataset="*", method="*", seed="*")
    for record_path in sorted(Path(experiment_dir).glob(f"{runs}/{layout.RUN_RECORD}")):
        cpu = json.loads(record_path.read_text()).get("environment", {}).get("cpu") or {}
        if not cpu.get("pinned_isa"):
            found.append(str(record_path.parent.relative_to(experiment_dir)))
    return found
