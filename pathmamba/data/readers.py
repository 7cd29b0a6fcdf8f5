"""Readers of the datasets' files, shared by the real and the synthetic datasets.

Layout (docs/design.md §3.2), folder names from the dataset's description (:mod:`pathmamba.data.specs`),
here the published datasets': ``<root>/training/*.png`` with the image-level label in the file name or in
a CSV table, ``<root>/{val,test}/img/*.png`` with masks of the same name in ``<root>/{val,test}/mask/``.
``index_dataset`` tolerates the variants seen in the wild and records each one it met in
``DatasetIndex.tolerated``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pathmamba.data.specs import DatasetSpec

#: A training folder named ``train`` is accepted for one named ``training`` (seen in copies in the wild).
TRAIN_ALIASES = {"training": "train"}
RGB_MODES = ("RGB", "RGBA")
#: The column of a label table holding the training image's file name.
TABLE_IMAGE_COLUMN = "image"


class LabelError(ValueError):
    """A training file name does not carry a readable image-level label."""


class DatasetLayoutError(ValueError):
    """A dataset folder does not have the published layout."""


class MaskError(ValueError):
    """A mask file cannot be read as class indices (0..K-1 tissue, K background)."""


@dataclass
class DatasetIndex:
    """The files of one dataset, sorted by file name.

    ``train``: (image, label) pairs, label a tuple of K ints 0/1 in the spec's class order.
    ``val`` / ``test``: (image, mask) pairs. ``root``: the folder that holds the splits (after
    descending into a nested top folder). ``tolerated``: one human-readable note per deviation from
    the published layout that was accepted.
    """

    root: Path
    spec: DatasetSpec
    train: list[tuple[Path, tuple[int, ...]]] = field(default_factory=list)
    val: list[tuple[Path, Path]] = field(default_factory=list)
    test: list[tuple[Path, Path]] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)


def expected_layout(spec: DatasetSpec) -> str:
    """The folder layout of ``spec``'s dataset, for error messages."""
    folders = spec.folders
    labels = (f", labels in <root>/{spec.labels.table}" if spec.labels.kind == "table" else "")
    return (f"<root>/{folders['training']}/*.png{labels}, <root>/{{{folders['val']},{folders['test']}}}/"
            f"{{{folders['images']},{folders['masks']}}}/*.png")


def training_folders(spec: DatasetSpec) -> tuple[str, ...]:
    """The names a training folder may have: the description's, and its tolerated alias."""
    name = spec.folders["training"]
    return (name, TRAIN_ALIASES[name]) if name in TRAIN_ALIASES else (name,)


def label_example(spec: DatasetSpec) -> str:
    """A training file name as ``spec``'s dataset writes it (for messages)."""
    return spec.train_filename("...", tuple(int(i in (0, spec.num_classes - 1)) for i in range(spec.num_classes)))


def parse_label(path: Path | str, spec: DatasetSpec) -> tuple[int, ...]:
    """Image-level label from a training file name: the 0/1 digits between the last '[' and its ']'.

    Spaces are ignored, so both ``...-[1 0 0 1].png`` (LUAD) and ``...+0[1101].png`` (BCSS) read as
    (1, 0, 0, 1) / (1, 1, 0, 1). Anything else raises ``LabelError`` naming the file.
    """
    name = Path(path).name
    n = len(spec.classes)
    start = name.rfind("[")
    end = name.find("]", start + 1)
    digits = name[start + 1:end].replace(" ", "") if start >= 0 and end >= 0 else None
    if digits is None or len(digits) != n or set(digits) - {"0", "1"}:
        found = "no '[...]'" if digits is None else f"{digits!r}"
        raise LabelError(
            f"{path}: cannot read the image-level label (found {found}); expected {n} digits of 0/1 "
            f"between the last '[' and ']', like {label_example(spec)!r}"
        )
    return tuple(int(d) for d in digits)


def check_label_form(path: Path, spec: DatasetSpec) -> None:
    """Raise ``LabelError`` naming the file if its label is not written as ``spec``'s dataset writes it:
    another dataset's files (the labels of both read alike, but the classes differ)."""
    separator = re.escape(spec.labels.separator)
    form = re.compile(rf"\[[01]({separator}[01]){{{spec.num_classes - 1}}}\]\.png$")
    if not form.search(path.name):
        raise LabelError(f"{path}: label not written as {spec.name} writes it, like {label_example(spec)!r}; is "
                         "this file from another dataset?")


def read_label_table(root: Path, spec: DatasetSpec) -> dict[str, tuple[int, ...]]:
    """Image-level labels by training file name from the dataset's CSV table (``labels.table``).

    The header is ``image`` and one column per class, named as the class (any order); every value 0 or
    1. A missing table, column or value, or an image listed twice, raises ``LabelError`` naming the
    table and the row.
    """
    path = Path(root) / spec.labels.table
    if not path.is_file():
        raise LabelError(f"{path}: label table not found; expected a CSV file with the columns "
                         f"{TABLE_IMAGE_COLUMN},{','.join(spec.classes)}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    header = [column.strip() for column in rows[0]] if rows else []
    expected = {TABLE_IMAGE_COLUMN, *spec.classes}
    if set(header) != expected or len(header) != len(expected):
        raise LabelError(f"{path}: header {','.join(header) or '(empty file)'}; expected the columns "
                         f"{TABLE_IMAGE_COLUMN},{','.join(spec.classes)} (any order, each once)")
    image_column = header.index(TABLE_IMAGE_COLUMN)
    class_columns = [header.index(name) for name in spec.classes]
    labels: dict[str, tuple[int, ...]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        values = [row[i].strip() if i < len(row) else "" for i in class_columns]
        image = row[image_column].strip() if image_column < len(row) else ""
        if len(row) != len(header) or not image or set(values) - {"0", "1"}:
            raise LabelError(f"{path}: line {number} {','.join(row)!r}; expected an image file name and "
                             f"0 or 1 for each of {', '.join(spec.classes)}")
        if image in labels:
            raise LabelError(f"{path}: line {number}: {image} is listed twice; expected one row per image")
        labels[image] = tuple(int(v) for v in values)
    return labels


def read_image(path: Path | str) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of an image file (read-only: copy before writing into it)."""
    with Image.open(path) as image:
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def read_mask(path: Path | str, spec: DatasetSpec) -> np.ndarray:
    """(H, W) uint8 class indices of a mask file: 0..K-1 the classes, K (``spec.background``) background.

    L-mode masks hold the indices directly. P-mode masks are read through their own palette: each index
    used becomes its colour, and the colour the class of ``spec.palette`` (a mask re-saved with another
    order of the same colours reads the same). RGB(A) masks are mapped through ``spec.palette`` too.
    A colour outside the palette, an index above K or another image mode raises ``MaskError``.
    """
    with Image.open(path) as image:
        if image.mode == "P":
            mask = _palette_to_indices(np.asarray(image), image.getpalette("RGB"), spec, path)
        elif image.mode == "L":
            mask = np.asarray(image)
        elif image.mode in RGB_MODES:
            mask = _colours_to_indices(np.asarray(image.convert("RGB")), spec, path)
        else:
            raise MaskError(
                f"{path}: mask in image mode {image.mode}; expected a P-mode or RGB PNG in the {spec.name} "
                f"palette or an L-mode PNG of class indices 0..{spec.background}"
            )
    if mask.max(initial=0) > spec.background:
        raise MaskError(f"{path}: mask value {mask.max()}; expected class indices 0..{spec.background} "
                        f"({spec.background}: background)")
    return mask


def in_dataset_palette(image: Image.Image, spec: DatasetSpec) -> bool:
    """Whether an opened P-mode image's palette starts with ``spec.palette`` (index = class). Reads the
    PNG header's palette only, without decoding the pixels."""
    own = bytes(value for rgb in spec.palette for value in rgb)
    return image.palette is not None and image.palette.mode == "RGB" and image.palette.palette[:len(own)] == own


def _palette_to_indices(indices: np.ndarray, palette: list[int] | None, spec: DatasetSpec,
                        path: Path | str) -> np.ndarray:
    """(H, W) uint8 class indices of a P-mode mask's palette indices, matched by colour, not by index."""
    if palette is None:  # no PLTE chunk: nothing to read through, the indices are all there is
        return indices
    colours = np.array(palette, dtype=np.uint8).reshape(-1, 3)
    lookup = np.zeros(256, dtype=np.uint8)
    for index in np.unique(indices):
        colour = tuple(int(v) for v in colours[index]) if index < len(colours) else None
        if colour not in spec.palette:
            y, x = np.argwhere(indices == index)[0]
            found = (f"has the colour {colour}, not in the {spec.name} palette" if colour else
                     f"has no colour in the file's palette of {len(colours)}")
            raise MaskError(
                f"{path}: mask value {index} at row {y}, column {x} {found}; expected colours of the "
                f"{spec.name} palette {list(spec.palette)} (or an L-mode PNG of class indices)"
            )
        lookup[index] = spec.palette.index(colour)
    return lookup[indices]


def _colours_to_indices(rgb: np.ndarray, spec: DatasetSpec, path: Path | str) -> np.ndarray:
    """(H, W) uint8 palette indices of an (H, W, 3) uint8 RGB mask; vectorised via 24-bit colour codes."""
    codes = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    palette = np.array([(r << 16) | (g << 8) | b for r, g, b in spec.palette], dtype=np.uint32)
    order = np.argsort(palette)
    position = np.minimum(np.searchsorted(palette[order], codes), len(palette) - 1)
    known = palette[order][position] == codes
    if not known.all():
        y, x = np.argwhere(~known)[0]
        raise MaskError(
            f"{path}: colour {tuple(int(v) for v in rgb[y, x])} at row {y}, column {x} is not in the "
            f"{spec.name} palette; expected one of {list(spec.palette)}"
        )
    return order[position].astype(np.uint8)


def list_pngs(folder: Path) -> list[Path]:
    """*.png files of a folder sorted by name; hidden files (macOS '._' resource forks) skipped."""
    return sorted(p for p in folder.glob("*.png") if not p.name.startswith("."))


def split_root(root: Path, spec: DatasetSpec, tolerated: list[str]) -> Path:
    """The folder holding the splits: ``root``, or the folder nested under it (unzip artefact)."""
    start = root
    while not any((root / name).is_dir() for name in training_folders(spec)):
        # Hidden folders and __MACOSX (zip artefacts) do not count as a second top folder.
        subfolders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
        if len(subfolders) != 1:
            break
        root = subfolders[0]
    if root != start:
        tolerated.append(f"nested top folder: the splits are in {root.relative_to(start)}/ under {start}")
    return root


def training_folder(root: Path, spec: DatasetSpec, tolerated: list[str]) -> Path | None:
    """The training folder under ``root`` (the description's, or its tolerated alias, noted); None if
    there is none."""
    for name in training_folders(spec):
        if (root / name).is_dir():
            if name != spec.folders["training"]:
                tolerated.append(f"training images are in {name}/ instead of {spec.folders['training']}/")
            return root / name
    return None


def training_labels(root: Path, files: list[Path], spec: DatasetSpec) -> list[tuple[Path, tuple[int, ...]]]:
    """(image, label) pairs of the training images ``files``: each label read from its file name, or
    from the dataset's label table. A file without a label, or with one not in the dataset's form,
    raises ``LabelError`` naming it."""
    if spec.labels.kind == "table":
        table = read_label_table(root, spec)
        unlabelled = [path for path in files if path.name not in table]
        if unlabelled:
            raise LabelError(f"{unlabelled[0]}: no row in the label table {root / spec.labels.table} "
                             f"({len(unlabelled)} of {len(files)} training images have none)")
        return [(path, table[path.name]) for path in files]
    items = [(path, parse_label(path, spec)) for path in files]
    for path in files:
        check_label_form(path, spec)
    return items


def _training_items(
    root: Path, spec: DatasetSpec, tolerated: list[str]
) -> list[tuple[Path, tuple[int, ...]]]:
    """(image, label) pairs of the training split."""
    folder = training_folder(root, spec, tolerated)
    if folder is None:
        raise DatasetLayoutError(f"{root / spec.folders['training']}: no training folder; expected "
                                 f"{expected_layout(spec)}")
    files = list_pngs(folder)
    if not files:
        raise DatasetLayoutError(f"{folder}: no *.png training images; expected {expected_layout(spec)}")
    return training_labels(root, files, spec)


def paired_items(root: Path, split: str, spec: DatasetSpec, tolerated: list[str]) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a val/test split (``"val"`` or ``"test"``), matched by file name."""
    split_folder = root / spec.folders[split]
    image_folder, mask_folder = split_folder / spec.folders["images"], split_folder / spec.folders["masks"]
    for folder in (image_folder, mask_folder):
        if not folder.is_dir():
            raise DatasetLayoutError(f"{folder}: missing folder; expected {expected_layout(spec)}")
    images = {p.name: p for p in list_pngs(image_folder)}
    masks = {p.name: p for p in list_pngs(mask_folder)}
    pairs = [(images[name], masks[name]) for name in sorted(images.keys() & masks.keys())]
    for name in sorted(images.keys() - masks.keys()):
        tolerated.append(f"{split}: image {name} has no mask in {mask_folder}; skipped")
    for name in sorted(masks.keys() - images.keys()):
        tolerated.append(f"{split}: mask {name} has no image in {image_folder}; ignored")
    if not pairs:
        raise DatasetLayoutError(
            f"{split_folder}: no image with a mask of the same name; expected {expected_layout(spec)}"
        )
    # Opening a PNG reads its header only (palette included), so checking every mask stays cheap.
    rgb = foreign = 0
    for _, mask in pairs:
        with Image.open(mask) as image:
            rgb += image.mode in RGB_MODES
            foreign += image.mode == "P" and not in_dataset_palette(image, spec)
    if rgb:
        tolerated.append(
            f"{split}: {rgb} of {len(pairs)} masks are RGB, not P mode; read through the palette"
        )
    if foreign:
        tolerated.append(
            f"{split}: {foreign} of {len(pairs)} masks have a palette other than {spec.name}'s; read by colour"
        )
    return pairs


def split_counts(root: Path, spec: DatasetSpec) -> dict[str, int]:
    """Images per split of the dataset folder ``root``, counted without reading a file (for planning)."""
    root = split_root(Path(root), spec, [])
    training = training_folder(root, spec, [])
    return {"training": len(list_pngs(training)) if training else 0,
            **{split: len(list_pngs(root / spec.folders[split] / spec.folders["images"])) for split in ("val", "test")}}


def index_dataset(root: Path | str, spec: DatasetSpec) -> DatasetIndex:
    """Index a dataset folder in the published layout; raises ``DatasetLayoutError`` if it is not one.

    Tolerated and noted: a nested top folder, ``train/`` for ``training/``, val/test images without
    a mask (skipped), RGB masks and masks in another palette. A bad training file name, one written in
    another dataset's form (another dataset's folder), or a training image missing from the label table
    raises ``LabelError``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: dataset folder not found; expected {expected_layout(spec)}")
    tolerated: list[str] = []
    root = split_root(root, spec, tolerated)
    train = _training_items(root, spec, tolerated)
    val = paired_items(root, "val", spec, tolerated)
    test = paired_items(root, "test", spec, tolerated)
    return DatasetIndex(root=root, spec=spec, train=train, val=val, test=test, tolerated=tolerated)
