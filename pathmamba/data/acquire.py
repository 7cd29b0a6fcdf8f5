"""Getting a real dataset onto disk: download, verify against a checksum lock, normalise the layout.

Four ways in (docs/design.md §3.3), chosen per dataset in the config:

    source: gdrive   the published Google Drive folder, fetched file by file with gdown
    url: URL         one archive at a plain URL (a mirror), fetched with gdown too
    archive: PATH    zip file(s) downloaded by hand (a browser splits a large Drive folder into several)
    root: PATH       an extracted copy, used in place (nothing here runs for it)

Downloads go through :func:`pathmamba.core.download.download_file` (partial files resumed, never
used); a ``.zip`` that is not a zip archive (an HTML error page) is removed and fetched again.
:func:`prepare_dataset` refuses archives whose members overlap or expand beyond the extraction limits
before anything is extracted, extracts them (zip CRCs checked), moves
the files into the canonical layout of the dataset's description (the published datasets':
``<out>/training/*.png, <out>/{val,test}/{img,mask}/*.png``, and the label table if it has one; the
variants of :mod:`pathmamba.data.readers` tolerated, RGB masks and masks in another palette rewritten as
P-mode PNGs in the dataset's palette, unpaired val/test images left out) and writes
``<out>/manifest.json``. The SHA-256 of every archive is
checked against a lock file written on the first successful preparation of a complete set (the
published number of files per split); a mismatch stops before anything is extracted and removes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pathmamba.core.download import DownloadFailed, download_file
from pathmamba.core.errors import InputError
from pathmamba.core.files import atomic_write_json, file_sha256
from pathmamba.core.progress import ProgressLog
from pathmamba.data.readers import (
    RGB_MODES,
    DatasetLayoutError,
    LabelError,
    MaskError,
    expected_layout,
    in_dataset_palette,
    list_pngs,
    paired_items,
    read_mask,
    split_root,
    training_folder,
    training_labels,
)
from pathmamba.data.specs import DatasetSpec

log = logging.getLogger("pathmamba.data")

GDRIVE_FILE_URL = "https://drive.google.com/uc?id={}"
# Extraction limits, checked on the archives' directories before anything is written. PNG members barely
# compress (ratio ~1), so a member expanding more than MAX_RATIO times is a zip bomb, not a dataset;
# members under RATIO_FLOOR (small text files) may compress well. Both published datasets extract to
# far less than MAX_EXTRACTED_BYTES.
MAX_EXTRACTED_BYTES = 64 << 30
MAX_RATIO = 100
RATIO_FLOOR = 1 << 20


class ChecksumMismatch(RuntimeError):
    """A source file's SHA-256 differs from the lock file's."""


class ArchiveError(ValueError):
    """A source archive cannot be read."""


def not_a_zip(path: Path) -> str | None:
    """Why a file named ``*.zip`` is not a zip archive (e.g. an HTML error page), None if it is one or if
    its name does not end with .zip (a Drive folder's files are of any kind)."""
    if path.suffix.lower() != ".zip" or zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as handle:
        start = handle.read(40)
    return f"not a zip archive: {path.stat().st_size} bytes starting {start!r}"


def list_gdrive_folder(folder_id: str) -> list[tuple[str, str]]:
    """(file id, path inside the folder) of every file of a public Google Drive folder (network)."""
    import gdown
    from gdown.exceptions import DownloadError

    try:
        files = gdown.download_folder(id=folder_id, quiet=True, skip_download=True)
    except (DownloadError, OSError) as error:
        raise DownloadFailed(
            f"Google Drive folder {folder_id}: cannot list its files ({error}); without internet access "
            "here, download the folder by hand and give its zip(s) as 'archive'"
        ) from None
    return [(item.id, item.path) for item in files]


def download_dataset(spec: DatasetSpec, folder: Path, url: str | None = None) -> list[Path]:
    """Download ``spec``'s published Google Drive folder (or the archive at ``url``) into ``folder``.

    Returns the downloaded files. Files already complete are kept; partial ones resume.
    """
    folder = Path(folder)
    if url is not None:
        name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or f"{spec.name}.zip"
        return [download_file(url, folder / name, check=not_a_zip)]
    if spec.gdrive_folder is None:
        raise InputError(f"{spec.name}: no published Google Drive folder; give 'archive', 'url' or 'root'")
    files = list_gdrive_folder(spec.gdrive_folder)
    log.info("%s: %d files in Google Drive folder %s", spec.name, len(files), spec.gdrive_folder)
    return [download_file(GDRIVE_FILE_URL.format(file_id), folder / path, check=not_a_zip)
            for file_id, path in files]


# --- checksum lock -----------------------------------------------------------------------------------


def check_lock(lock: Path, sums: dict[str, str]) -> bool:
    """Compare ``sums`` (file name -> SHA-256) with the lock file; True if the lock exists and agrees.

    A missing lock returns False (first preparation). Different names or sums raise
    :class:`ChecksumMismatch` listing each difference; nothing is removed.
    """
    lock = Path(lock)
    if not lock.exists():
        return False
    locked = json.loads(lock.read_text())["sha256"]
    problems = []
    for name in sorted(sums.keys() | locked.keys()):
        if name not in locked:
            problems.append(f"{name}: not in the lock (sha256 {sums[name]})")
        elif name not in sums:
            problems.append(f"{name}: in the lock but not among the sources")
        elif sums[name] != locked[name]:
            problems.append(f"{name}: sha256 {sums[name]}, the lock has {locked[name]}")
    if problems:
        raise ChecksumMismatch(
            f"{lock}: the sources differ from the checksums recorded on the first verified download:\n  "
            + "\n  ".join(problems)
            + f"\nNothing was removed. If the dataset was re-published on purpose, delete {lock} to "
            "accept the new files; otherwise download them again."
        )
    return True


def write_lock(lock: Path, dataset: str, sums: dict[str, str]) -> None:
    atomic_write_json(Path(lock), {"dataset": dataset, "sha256": dict(sorted(sums.items()))})


# --- normalisation -----------------------------------------------------------------------------------


def check_archives(archives: list[Path], into: Path) -> None:
    """Refuse, before anything is extracted, archives that overlap or expand too much.

    Two members extracted to the same path (in two parts, or twice in one; also names that differ only in
    what zipfile drops, such as ``a//b`` and ``a/b``) would silently overwrite each other; a member with an
    absolute path or a ``..`` part would be extracted elsewhere than it says; a member expanding more than
    ``MAX_RATIO`` times, or a total beyond ``MAX_EXTRACTED_BYTES`` or the free space of ``into``, is a zip
    bomb or the wrong file. Raises :class:`ArchiveError` naming the member and its part.
    """
    owners: dict[str, tuple[str, Path]] = {}  # by the path it is extracted to: the member's name, its part
    total = 0
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as handle:
                members = [info for info in handle.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
            raise ArchiveError(f"{archive}: not a readable zip archive ({error}); download it again") from None
        for info in members:
            if info.filename.startswith("/") or ".." in info.filename.split("/"):
                raise ArchiveError(f"{archive}: member {info.filename!r} has an absolute path or a '..' part; a "
                                   "dataset archive holds relative paths only (a hand-made or tampered archive?); "
                                   "nothing extracted")
            extracted = _extracted_path(info.filename)
            if extracted in owners:
                first, owner = owners[extracted]
                where = f"twice in {archive}" if owner == archive else f"in both {owner} and {archive}"
                if first != info.filename:
                    where += f" (as {first!r} and {info.filename!r}, both extracted to {extracted})"
                raise ArchiveError(f"{extracted}: {where}; the parts of a dataset must not overlap (one "
                                   "part given twice, or parts of two different downloads?); nothing extracted")
            owners[extracted] = (info.filename, archive)
            if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise ArchiveError(f"{archive}: member {info.filename} expands from {info.compress_size} to "
                                   f"{info.file_size} bytes, more than {MAX_RATIO} times; refused as a zip bomb, "
                                   "nothing extracted")
            total += info.file_size
    free = shutil.disk_usage(into).free
    if total > min(MAX_EXTRACTED_BYTES, free):
        limit = "the limit" if total > MAX_EXTRACTED_BYTES else f"the free space of {into}"
        raise ArchiveError(f"{', '.join(map(str, archives))}: {total} bytes to extract, more than {limit} "
                           f"({min(MAX_EXTRACTED_BYTES, free)} bytes); nothing extracted")


def _extracted_path(member: str) -> str:
    """Where ``zipfile.extractall`` writes ``member``, relative to its target: the name without empty,
    ``.`` and ``..`` parts (what zipfile drops)."""
    return "/".join(part for part in member.split("/") if part not in ("", ".", ".."))


def _extract(archive: Path, into: Path) -> None:
    """Extract a zip into ``into``; names escaping it are neutralised by zipfile, CRCs checked on read."""
    try:
        with zipfile.ZipFile(archive) as handle:
            handle.extractall(into)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise ArchiveError(f"{archive}: not a readable zip archive ({error}); download it again") from None


def _place(source: Path, target: Path, move: bool) -> None:
    """Move ``source`` (ours) or link / copy it (the user's or the download cache) to ``target``."""
    if move:
        os.replace(source, target)
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copy2(source, target)


def _write_palette_mask(source: Path, target: Path, spec: DatasetSpec) -> bool:
    """Rewrite an RGB mask, or a P-mode one in another palette, as a P-mode PNG in the dataset's palette;
    False (nothing written) if it cannot be read."""
    try:
        mask = read_mask(source, spec)
    except (MaskError, OSError, SyntaxError, ValueError):
        return False  # left as it is; validation reports it with its path
    indexed = Image.fromarray(mask)
    indexed.putpalette(spec.flat_palette)
    indexed.save(target)
    return True


def normalise(tree: Path, spec: DatasetSpec, out: Path, move: bool) -> list[str]:
    """Lay out the dataset found under ``tree`` canonically in the new folder ``out``.

    Returns the notes of what was tolerated (see :func:`pathmamba.data.readers.index_dataset`).
    Training file names are not parsed here: bad names are validation's to report, all at once.
    """
    tolerated: list[str] = []
    root = split_root(Path(tree), spec, tolerated)
    training = training_folder(root, spec, tolerated)
    if training is None:
        raise DatasetLayoutError(f"{root / spec.folders['training']}: no training folder; expected "
                                 f"{expected_layout(spec)}")
    folders = spec.folders
    (out / folders["training"]).mkdir(parents=True)
    pairs = {split: paired_items(root, split, spec, tolerated) for split in ("val", "test")}
    training_files = list_pngs(training)
    progress = ProgressLog(log, f"{spec.name}: files laid out", len(training_files) + sum(map(len, pairs.values())))
    for path in training_files:
        _place(path, out / folders["training"] / path.name, move)
        progress.update()
    if spec.labels.kind == "table" and (root / spec.labels.table).is_file():
        (out / spec.labels.table).parent.mkdir(parents=True, exist_ok=True)
        _place(root / spec.labels.table, out / spec.labels.table, move)
    for split in ("val", "test"):
        images, masks = out / folders[split] / folders["images"], out / folders[split] / folders["masks"]
        images.mkdir(parents=True)
        masks.mkdir()
        for image, mask in pairs[split]:
            progress.update()
            _place(image, images / image.name, move)
            with Image.open(mask) as opened:
                # RGB masks and palettes in another order are rewritten: the canonical copy's index is its class.
                rewrite = opened.mode in RGB_MODES or (opened.mode == "P" and not in_dataset_palette(opened, spec))
            if not (rewrite and _write_palette_mask(mask, masks / mask.name, spec)):
                _place(mask, masks / mask.name, move)
    return tolerated


def dataset_statistics(out: Path, spec: DatasetSpec) -> dict:
    """Counts per split, image-level label frequencies and val/test pixel class frequencies of ``out``.

    Unreadable names and masks are skipped here (validation reports them).
    """
    names = [*spec.classes, "background"]
    folders = spec.folders
    training = list_pngs(out / folders["training"])
    positives = np.zeros(len(spec.classes), dtype=np.int64)
    try:
        labels = training_labels(out, training, spec)
    except LabelError:  # one unreadable label: counted one by one (validation reports them all)
        labels = []
        for path in training:
            try:
                labels += training_labels(out, [path], spec)
            except LabelError:
                continue
    for _, label in labels:
        positives += label
    stats = {
        "counts": {"training": len(training)},
        "label_frequency": {c: int(n) for c, n in zip(spec.classes, positives, strict=True)},
        "pixel_frequency": {},
    }
    for split in ("val", "test"):
        masks = list_pngs(out / folders[split] / folders["masks"])
        stats["counts"][split] = len(masks)
        pixels = np.zeros(spec.background + 1, dtype=np.int64)
        for path in masks:
            try:
                pixels += np.bincount(read_mask(path, spec).ravel(), minlength=spec.background + 1)
            except (MaskError, OSError, SyntaxError, ValueError):
                continue
        total = max(int(pixels.sum()), 1)
        stats["pixel_frequency"][split] = {c: round(int(n) / total, 6) for c, n in zip(names, pixels, strict=True)}
    return stats


def prepare_dataset(spec: DatasetSpec, sources: list[Path], out: Path, lock: Path,
                    origin: dict | None = None) -> dict:
    """Build the canonical dataset ``out`` from ``sources`` and return its manifest.

    ``sources``: zip archives (all extracted into one tree, as the parts of a split Drive download)
    or one folder holding the extracted tree (a Drive folder downloaded file by file). Their SHA-256
    sums are checked against ``lock``, or written to it when it does not exist yet and the built dataset
    has the published number of files per split (an incomplete set of parts is not locked). ``origin`` (how the sources were obtained) is recorded in the manifest. ``out`` is
    built in a hidden sibling and renamed at the end, so it is complete or absent.
    """
    sources = [Path(s) for s in sources]
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it to prepare {spec.name} again")
    for source in sources:
        if not source.exists():
            raise FileNotFoundError(f"{source}: source of {spec.name} not found")
    folders = [s for s in sources if s.is_dir()]
    if folders and len(sources) > 1:
        raise InputError(f"{spec.name}: give zip archives or one extracted folder, not both: {sources}")
    files = sorted(p for p in folders[0].rglob("*") if p.is_file()) if folders else sources
    base = folders[0] if folders else None
    sums = {(p.relative_to(base).as_posix() if base else p.name): file_sha256(p) for p in files}
    locked = check_lock(lock, sums)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not folders:
        check_archives(sources, out.parent)

    building = out.parent / f".{out.name}.building-{os.getpid()}"
    extracted = out.parent / f".{out.name}.extracting-{os.getpid()}"
    try:
        if folders:
            tolerated = normalise(folders[0], spec, building, move=False)
        else:
            for number, archive in enumerate(sources, 1):
                log.info("%s: extracting %s (%d of %d)", spec.name, archive, number, len(sources))
                _extract(archive, extracted)
            # Name the archives, not the temporary folder they were extracted to.
            archives = " + ".join(source.name for source in sources)
            try:
                tolerated = normalise(extracted, spec, building, move=True)
            except DatasetLayoutError as error:
                raise DatasetLayoutError(str(error).replace(str(extracted), f"{archives} (extracted)")) from None
            tolerated = [note.replace(str(extracted), archives) for note in tolerated]
        manifest = {"dataset": spec.name, "origin": origin or {"archives": [str(s) for s in sources]},
                    "sha256": sums, **dataset_statistics(building, spec), "tolerated": tolerated}
        atomic_write_json(building / "manifest.json", manifest)
        building.rename(out)
    finally:
        shutil.rmtree(extracted, ignore_errors=True)
        shutil.rmtree(building, ignore_errors=True)
    complete = spec.counts is None or manifest["counts"] == spec.counts
    if not locked and complete:
        write_lock(lock, spec.name, sums)
        log.info("%s: wrote the checksums of %d source files to %s", spec.name, len(sums), lock)
    elif not locked:
        # An incomplete set of parts must not become the reference the complete set is refused against.
        log.warning("%s: the checksum lock %s is not written: the files per split %s differ from the "
                    "published %s (a part missing?)", spec.name, lock, manifest["counts"], spec.counts)
    for note in tolerated:
        log.warning("%s: %s", spec.name, note)
    return manifest


def download_with_record(spec: DatasetSpec, folder: Path, record: Path, url: str | None = None) -> list[Path]:
    """:func:`download_dataset`, then ``record`` (JSON): the dataset, where the files came from, the
    download folder and the files; what ``prepare-dataset --downloaded`` reads."""
    files = download_dataset(spec, folder, url)
    origin = {"url": url} if url else {"gdrive_folder": spec.gdrive_folder}
    atomic_write_json(record, {"dataset": spec.name, "origin": origin, "folder": str(folder),
                               "files": [str(f) for f in files]})
    return files


def prepare_downloaded(spec: DatasetSpec, record: Path, out: Path, lock: Path) -> dict:
    """:func:`prepare_dataset` from a :func:`download_with_record` record: its zip archives, or its
    folder when the download was the extracted files."""
    downloaded = json.loads(Path(record).read_text())
    zips = [Path(f) for f in downloaded["files"] if f.lower().endswith(".zip")]
    return prepare_dataset(spec, zips or [Path(downloaded["folder"])], out, lock, downloaded["origin"])

