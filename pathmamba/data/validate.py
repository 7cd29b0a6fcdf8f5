"""Validation of a dataset folder before any training job (docs/design.md §3.4).

Checks, each problem recorded with the path of its file:

- layout: a training folder and ``{val,test}/{img,mask}``, none of them empty (the variants that
  :func:`pathmamba.data.readers.index_dataset` tolerates are noted, not failed);
- counts per split: exactly the published ones for a real dataset (``spec.counts``); a difference is a
  problem, or only a warning with ``counts="warn"``;
- training labels: in a file name, readable by :func:`~pathmamba.data.readers.parse_label` and written in
  the dataset's own form (``[1 0 0 1]`` for LUAD, ``[1101]`` for BCSS); in a label table, one valid row
  per training image and no row without its image; each label with at least one positive class;
- every image decodes completely, is RGB and ``image_size`` x ``image_size`` px;
- every mask decodes to class indices 0..K (:func:`~pathmamba.data.readers.read_mask`) and has the size
  of its image.

Files are decoded in a thread pool (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pathmamba.core.errors import InputError
from pathmamba.core.files import atomic_write_json
from pathmamba.core.progress import ProgressLog
from pathmamba.data.readers import (
    RGB_MODES,
    DatasetIndex,
    DatasetLayoutError,
    LabelError,
    MaskError,
    check_label_form,
    index_dataset,
    list_pngs,
    paired_items,
    parse_label,
    read_label_table,
    read_mask,
    split_root,
    training_folder,
)
from pathmamba.data.specs import DatasetSpec, DescriptionError, recorded_spec

log = logging.getLogger("pathmamba.data")

COUNT_POLICIES = ("error", "warn")
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Problem:
    """One problem of one file (or folder): ``kind`` groups problems in the summary."""

    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset`; ``ok`` when there is no problem."""

    dataset: str
    root: str
    image_size: int
    counts: dict[str, int]
    expected_counts: dict[str, int] | None
    checked_files: int = 0
    fingerprint: str = ""
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)
    dataset_description: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        record = asdict(self)
        record["ok"] = self.ok
        record["problem_kinds"] = dict(Counter(p.kind for p in self.problems).most_common())
        return record

    def summary(self, limit: int | None = None) -> str:
        """A few lines for a human: the verdict, counts, notes, then the problems with their paths
        (the first ``limit`` of them, all if None)."""
        counts = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        lines = []
        if self.ok:
            lines.append(f"{self.dataset}: valid ({self.root}): {counts}; {self.checked_files} files "
                         f"checked, images {self.image_size}x{self.image_size} px")
        else:
            files = len({p.path for p in self.problems})
            kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(p.kind for p in self.problems).most_common())
            lines.append(f"{self.dataset}: INVALID ({self.root}): {len(self.problems)} problems in {files} "
                         f"files ({kinds}); {counts}; {self.checked_files} files checked")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  tolerated: {t}" for t in self.tolerated]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if limit is not None and len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more problems (all in the log)")
        return "\n".join(lines)


class DatasetInvalid(ValueError):
    """A dataset failed validation; the message is the report's summary."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


def _problem_from(error: Exception, path: Path, kind: str) -> Problem:
    """A problem from a reader's error, whose message starts with the path already."""
    return Problem(str(path), kind, str(error).removeprefix(f"{path}: "))


def check_image(path: Path, size: int) -> tuple[list[Problem], tuple[int, int] | None]:
    """Problems of one image file and its (width, height), None if it does not decode."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not in training
            mode, shape = image.mode, image.size
    except UnidentifiedImageError:
        return [Problem(str(path), "unreadable image", "not an image file (PIL cannot identify it); "
                        "expected a PNG")], None
    except DECODE_ERRORS as error:
        return [Problem(str(path), "unreadable image", f"does not decode ({error}); the file is damaged "
                        "or incomplete")], None
    problems = []
    if mode not in RGB_MODES:
        problems.append(Problem(str(path), "image mode", f"image mode {mode}; expected RGB"))
    if shape != (size, size):
        problems.append(Problem(str(path), "image size", f"image is {shape[0]}x{shape[1]} px; expected "
                                f"{size}x{size}"))
    return problems, shape


def check_pair(image: Path, mask: Path, spec: DatasetSpec, size: int) -> list[Problem]:
    """Problems of one val/test image and its mask."""
    problems, shape = check_image(image, size)
    try:
        values = read_mask(mask, spec)
    except UnidentifiedImageError:
        return [*problems, Problem(str(mask), "unreadable mask", "not an image file (PIL cannot identify it); "
                                   "expected a PNG")]
    except MaskError as error:
        return [*problems, _problem_from(error, mask, "mask values")]
    except DECODE_ERRORS as error:
        return [*problems, Problem(str(mask), "unreadable mask", f"does not decode ({error}); the file "
                                   "is damaged or incomplete")]
    if shape is not None and values.shape[::-1] != shape:
        problems.append(Problem(str(mask), "mask size", f"mask is {values.shape[1]}x{values.shape[0]} px "
                                f"but its image {image} is {shape[0]}x{shape[1]} px; expected the same size"))
    return problems


def check_training_name(path: Path, spec: DatasetSpec) -> list[Problem]:
    """Problems of one training file name: its label, its form, at least one positive class."""
    try:
        label = parse_label(path, spec)
    except LabelError as error:
        return [_problem_from(error, path, "label")]
    try:
        check_label_form(path, spec)
    except LabelError as error:
        return [_problem_from(error, path, "label form")]
    return _positive(path, label)


def _positive(path: Path, label: tuple[int, ...]) -> list[Problem]:
    if not any(label):
        return [Problem(str(path), "no positive label", f"label {list(label)} has no tissue class; "
                        "expected at least one 1 per training image")]
    return []


def check_label_table(root: Path, training: list[Path], spec: DatasetSpec) -> list[Problem]:
    """Problems of a label table: unreadable, a training image without a row, a row without its image,
    a label without a positive class."""
    table = root / spec.labels.table
    try:
        labels = read_label_table(root, spec)
    except LabelError as error:
        return [_problem_from(error, table, "label table")]
    problems = []
    for path in training:
        if path.name not in labels:
            problems.append(Problem(str(path), "label", f"no row in the label table {table}"))
        else:
            problems += _positive(path, labels[path.name])
    names = {path.name for path in training}
    problems += [Problem(str(table), "label table", f"row for {name}, which is not among the training images")
                 for name in sorted(labels.keys() - names)]
    return problems


def label_files(root: Path, spec: DatasetSpec) -> list[Path]:
    """The label table of ``spec``'s dataset at ``root`` when it has one (a file every job reads)."""
    table = root / spec.labels.table if spec.labels.kind == "table" else None
    return [table] if table is not None and table.is_file() else []


def _training_files(root: Path, spec: DatasetSpec, problems: list[Problem], tolerated: list[str]) -> list[Path]:
    folder = training_folder(root, spec, tolerated)
    if folder is None:
        problems.append(Problem(str(root / spec.folders["training"]), "layout", "missing training folder; "
                                f"expected <root>/{spec.folders['training']}/*.png"))
        return []
    files = list_pngs(folder)
    if not files:
        problems.append(Problem(str(folder), "layout", "empty split folder: no *.png training images"))
    return files


def _pairs(root: Path, split: str, spec: DatasetSpec, problems: list[Problem],
           tolerated: list[str]) -> list[tuple[Path, Path]]:
    image_folder = root / spec.folders[split] / spec.folders["images"]
    if image_folder.is_dir() and not list_pngs(image_folder):
        problems.append(Problem(str(image_folder), "layout", "empty split folder: no *.png images"))
        return []
    try:
        return paired_items(root, split, spec, tolerated)
    except DatasetLayoutError as error:
        path = str(error).split(": ", 1)[0]  # the readers' messages start with the folder's path
        problems.append(_problem_from(error, Path(path), "layout"))
        return []


def validate_dataset(root: Path, spec: DatasetSpec, image_size: int = 224, counts: str = "error",
                     workers: int = 1) -> ValidationReport:
    """Check every file of the dataset at ``root``; return the report (raises nothing for bad data).

    ``counts``: ``"error"`` makes a split count other than the published one a problem, ``"warn"``
    only a warning. ``workers``: decoding threads.
    """
    if counts not in COUNT_POLICIES:
        raise ValueError(f"counts={counts!r}; expected one of {COUNT_POLICIES}")
    root = Path(root)
    report = ValidationReport(spec.name, str(root), image_size, {}, spec.counts,
                              dataset_description=spec.description)
    if not root.is_dir():
        report.problems.append(Problem(str(root), "layout", "dataset folder not found"))
        return report
    root = split_root(root, spec, report.tolerated)
    training = _training_files(root, spec, report.problems, report.tolerated)
    pairs = {split: _pairs(root, split, spec, report.problems, report.tolerated) for split in ("val", "test")}
    report.counts = {"training": len(training), **{split: len(items) for split, items in pairs.items()}}

    if spec.labels.kind == "table":
        report.problems += check_label_table(root, training, spec)
    else:
        for path in training:
            report.problems += check_training_name(path, spec)
    progress = ProgressLog(log, f"{spec.name}: images checked", len(training) + sum(map(len, pairs.values())))
    decoded = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for problems in pool.map(lambda path: check_image(path, image_size)[0], training):
            decoded.append(problems)
            progress.update()
        for items in pairs.values():
            for problems in pool.map(lambda pair: check_pair(*pair, spec, image_size), items):
                decoded.append(problems)
                progress.update()
    for problems in decoded:
        report.problems += problems
    report.checked_files = len(training) + 2 * sum(len(items) for items in pairs.values())
    report.fingerprint = dataset_fingerprint(root, training + label_files(root, spec)
                                             + [path for items in pairs.values() for pair in items for path in pair])

    for split, expected in (spec.counts or {}).items():
        found = report.counts[split]
        if found != expected:
            message = f"{split}: {found} usable files, {spec.name} has {expected} ({found - expected:+d})"
            if counts == "error":
                report.problems.append(Problem(str(root / split), "count", message + "; an incomplete "
                                               "download or extraction? (validate.counts: warn accepts it)"))
            else:
                report.warnings.append(message)
    return report


# --- the dataset as validated ------------------------------------------------------------------------


def dataset_fingerprint(root: Path, files: list[Path]) -> str:
    """SHA-256 of the path (relative to ``root``), size and modification time of every file a job reads.
    A file added, removed, replaced or edited changes it; the dataset folder's own mtime, which is all
    a workflow sees of a folder input, does not change when a file inside it does."""
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def index_files(index: DatasetIndex) -> list[Path]:
    """Every file of an index: training images (and the label table), val/test images and masks."""
    return ([path for path, _ in index.train] + label_files(index.root, index.spec)
            + [path for split in (index.val, index.test) for pair in split for path in pair])


def validate_and_write(root: Path, spec: DatasetSpec, out: Path, image_size: int = 224, counts: str = "error",
                       workers: int = 1) -> ValidationReport:
    """:func:`validate_dataset`, then the report as JSON at ``out`` (with the fingerprint that
    :func:`check_validated` compares against); an invalid dataset raises :class:`DatasetInvalid` and
    writes nothing."""
    report = validate_dataset(root, spec, image_size, counts, workers)
    if not report.ok:
        raise DatasetInvalid(report)
    atomic_write_json(out, report.to_dict())
    return report


def check_validated(report_path: Path, data_root: Path) -> None:
    """Refuse (:class:`InputError`) data at ``data_root`` whose files changed since its validation report
    ``report_path`` was written: a job must not use files that no validation checked, nor mix results of
    two versions of a dataset."""
    try:
        report = json.loads(Path(report_path).read_text())
        spec, validated = recorded_spec(report), report["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError, DescriptionError) as error:
        raise InputError(f"{report_path}: not a validation report of this version ({error!r}); delete it to "
                         "validate the dataset again") from None
    index = index_dataset(data_root, spec)
    if dataset_fingerprint(index.root, index_files(index)) != validated:
        now = {"training": len(index.train), "val": len(index.val), "test": len(index.test)}
        raise InputError(f"{data_root}: files added, removed or changed since its validation ({report_path}: "
                         f"{report['counts']}, now {now}); delete {report_path} to validate it again (the "
                         "workflow then reruns every job that used it)")
