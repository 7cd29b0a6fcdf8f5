"""The one way the package downloads a file: a dataset's archive or a backbone's ImageNet weights.

http(s) URLs (Google Drive file links included) go through gdown, which answers Drive's confirmation
page and writes ``<file><8 random chars>.part``, renamed when complete: the destination only ever appears
whole. A later call resumes a partial file with an HTTP range request, or restarts from zero when the
server cannot resume. ``file://`` URLs (a mirror on a shared disk, a machine without network) are copied
through a temporary sibling the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from pathmamba.core.errors import NO_ROOM, disk_full
from pathmamba.core.files import temporary_sibling
from pathmamba.core.progress import format_duration

log = logging.getLogger("pathmamba.core.download")

DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_RETRIES = 3

#: Why a downloaded file is not the one asked for (an HTML error page saved as an archive, a SHA-256 other
#: than the published one), or None when it is.
FileCheck = Callable[[Path], "str | None"]


class DownloadFailed(RuntimeError):
    """A download did not complete, or brought the wrong file; a partial file is kept for the next attempt
    to resume. The message names the URL and the destination; the CLI prints it without a traceback."""


def download_file(url: str, dest: Path, check: FileCheck | None = None, retries: int = DOWNLOAD_RETRIES,
                  timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest``; return ``dest``.

    An existing ``dest`` that passes ``check`` is taken as done; one that fails it (an earlier download's
    error page) is removed and fetched again. A download that fails ``check`` is removed and is a
    :class:`DownloadFailed`, as is a transfer that breaks off (its partial file kept to resume).
    """
    dest = Path(dest)
    if dest.exists() and check is not None and (reason := check(dest)):
        log.warning("%s: %s; removed, downloading it again", dest, reason)
        dest.unlink()
    if dest.exists():
        log.info("%s already downloaded", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if urlparse(url).scheme == "file":
            _copy_local(url, dest)
        else:
            _download_resuming(url, dest, retries, timeout)
    except OSError as error:
        if error.errno in NO_ROOM:
            raise disk_full(dest, None) from None
        raise
    if check is not None and (reason := check(dest)):
        dest.unlink()  # never "already downloaded" on the next call
        raise DownloadFailed(f"{url}: the server sent another file than the one asked for ({reason}); removed "
                             f"{dest}; check the URL, or download the file by hand")
    return dest


def _copy_local(url: str, dest: Path) -> None:
    source = Path(unquote(urlparse(url).path))
    tmp = temporary_sibling(dest)
    try:
        try:
            shutil.copyfile(source, tmp)
        except OSError as error:
            if error.errno in NO_ROOM:
                raise
            raise DownloadFailed(f"cannot download {url} to {dest}: {error.strerror or error}; without network, "
                                 "fetch the file elsewhere and give its file:// URL") from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_resuming(url: str, dest: Path, retries: int, timeout: float) -> None:
    import gdown
    from gdown.exceptions import DownloadError

    quiet = not sys.stderr.isatty()  # progress bars on a terminal, not in log files
    for attempt in ("resume", "restart") if partial_files(dest) else ("start",):
        before = _partial_size(dest)
        log.info("downloading %s to %s (%s)", url, dest, attempt)
        try:
            with _logging_transfer(dest):
                gdown.download(url=url, output=str(dest), quiet=quiet, resume=True, retries=retries,
                               timeout=timeout)
        except (DownloadError, OSError) as error:
            if getattr(error, "errno", None) in NO_ROOM:
                raise
            failure = error
        else:
            if dest.exists():
                return
            failure = OSError(errno.EIO, "gdown wrote nothing")
        if attempt == "resume" and _partial_size(dest) == before:
            # Not one byte added: the server cannot continue this partial file (no range support, or
            # the file changed), so our partial bytes are worthless and the transfer starts from zero.
            log.warning("cannot resume %s (%s); restarting from zero", dest, failure)
            for part in partial_files(dest):
                part.unlink()
        else:
            break
    parts = ", ".join(str(p) for p in partial_files(dest)) or "none"
    raise DownloadFailed(f"{url}: download to {dest} failed ({failure}); partial file kept for "
                         f"the next attempt to resume: {parts}")


def partial_files(dest: Path) -> list[Path]:
    """gdown's partial files of ``dest``: ``<name><8 random chars>.part`` beside it."""
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir()
                  if p.name.startswith(dest.name) and p.name.endswith(".part")
                  and len(p.name) == len(dest.name) + 8 + len(".part"))


def _partial_size(dest: Path) -> int:
    return sum(p.stat().st_size for p in partial_files(dest))


@contextmanager
def _logging_transfer(dest: Path, every: float = 30.0):
    """Log the bytes of ``dest`` downloaded so far and the rate every ``every`` seconds while the body
    runs, and the total at its end: gdown's progress bar goes to a terminal only, not to a log file."""
    stop = threading.Event()
    started, before = time.monotonic(), _partial_size(dest)

    def rate_line(size: int) -> str:
        seconds = time.monotonic() - started
        return (f"{size / 1e6:.1f} MB, {(size - before) / 1e6 / max(seconds, 1e-9):.2f} MB/s over "
                f"{format_duration(seconds)}")

    def report() -> None:
        while not stop.wait(every):
            log.info("downloading %s: %s", dest.name, rate_line(_partial_size(dest)))

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if dest.exists():
        log.info("downloaded %s: %s", dest.name, rate_line(dest.stat().st_size))
