"""Datasets described as data (docs/design.md §3.1, docs/adding-a-dataset.md): one JSON file per dataset.

A description names the tissue classes with their mask colours, the background, how the training
images' image-level labels are written (in the file name or in a CSV table), the split folders, the
published number of files per split and where the files are downloaded from. The published datasets
and the synthetic demo datasets are the files in ``pathmamba/data/descriptions/``; a user's dataset is a
file of the same form anywhere, given by its path wherever a dataset name is taken.

Masks hold class indices: the ``K`` tissue classes are 0..K-1 in the order listed, the background
(not scored) is ``K``, so every description's palette is its classes' colours, then the background's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).parent / "descriptions"
DESCRIPTION_SUFFIX = ".json"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
#: What :data:`NAME_PATTERN` allows, in words, for error messages.
NAME_RULE = "lower-case letters, digits, '.', '_' or '-'"
LABEL_SOURCES = ("file name", "table")
SPLITS = ("training", "val", "test")
FOLDER_KEYS = (*SPLITS, "images", "masks")
#: Procedural textures of the synthetic generator (pathmamba/data/synthetic.py), by tissue.
TEXTURES = ("tumour", "necrosis", "lymphocyte", "stroma")
#: How synthetic file stems look: LUAD-HistoSeg's ``<patient>-<x>-<y>``, BCSS's TCGA barcodes.
STEM_STYLES = ("patient-x-y", "tcga-xy")
MAX_CLASSES = 255  # masks are 8-bit and the background takes the index after the last class


class DescriptionError(ValueError):
    """A dataset description file is not valid; the message names the file and the key."""


@dataclass(frozen=True)
class LabelSource:
    """Where a training image's image-level label is read.

    ``kind`` ``"file name"``: in the name, ``file_name`` a pattern like ``"{stem}-[{label}].png"`` whose
    ``{label}`` is one 0/1 digit per class joined by ``separator``. ``kind`` ``"table"``: in the CSV file
    ``table`` (relative to the dataset folder) with a column ``image`` (the training file's name) and one
    0/1 column per class, named as the class.
    """

    kind: str
    file_name: str | None = None
    separator: str = ""
    table: str | None = None


@dataclass(frozen=True)
class SyntheticStyle:
    """How the generator draws a synthetic dataset: the real dataset it ``imitates`` (or None), the file
    ``stems`` style and each class's texture (:data:`TEXTURES`)."""

    imitates: str | None
    stems: str
    textures: tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's description (see the module's docstring).

    ``palette``: the classes' RGB colours, then the background's (mask index ``num_classes``).
    ``counts``: the published number of files per split (None: not published, e.g. synthetic data).
    ``white_glass``: the background is bright empty glass (WSSS-Tissue's pseudo masks ignore it there).
    ``description``: the file's content, recorded with every model trained on the dataset.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    labels: LabelSource
    folders: dict[str, str]
    white_glass: bool = False
    counts: dict[str, int] | None = None
    gdrive_folder: str | None = None
    synthetic: SyntheticStyle | None = None
    source: str = ""
    description: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def background(self) -> int:
        """The background's mask index: the one after the last class."""
        return len(self.classes)

    @property
    def flat_palette(self) -> list[int]:
        """The palette as PIL's flat list of 768 values (unused entries black)."""
        flat = [value for rgb in self.palette for value in rgb]
        return flat + [0] * (768 - len(flat))

    def train_filename(self, stem: str, label: tuple[int, ...]) -> str:
        """A training file name for ``stem``: carrying ``label`` in this dataset's own pattern, or, when
        labels are in a table, just ``<stem>.png``."""
        if self.labels.kind == "table":
            return f"{stem}.png"
        digits = self.labels.separator.join(str(int(v)) for v in label)
        return self.labels.file_name.format(stem=stem, label=digits)


def dataset_names() -> list[str]:
    """The shipped datasets' names."""
    return sorted(path.stem for path in SHIPPED.glob(f"*{DESCRIPTION_SUFFIX}"))


def is_description_path(name_or_path: str | Path) -> bool:
    """Whether a ``--dataset`` value is a description file's path rather than a shipped dataset's name."""
    text = str(name_or_path)
    return text.endswith(DESCRIPTION_SUFFIX) or "/" in text or "\\" in text


def get_dataset_spec(name_or_path: str | Path) -> DatasetSpec:
    """The spec of a shipped dataset by name, or of the description file at a path (ending in .json).

    An unknown name raises ``KeyError`` listing the shipped names; a bad file :class:`DescriptionError`.
    """
    if is_description_path(name_or_path):
        return load_description(Path(name_or_path))
    if str(name_or_path) not in dataset_names():
        raise KeyError(f"unknown dataset {str(name_or_path)!r}; shipped datasets: {', '.join(dataset_names())}, "
                       "or give the path of a dataset description file (docs/adding-a-dataset.md)")
    return _shipped(str(name_or_path))


@cache
def _shipped(name: str) -> DatasetSpec:
    return load_description(SHIPPED / f"{name}{DESCRIPTION_SUFFIX}")


def recorded_spec(record: dict) -> DatasetSpec:
    """The dataset spec of a model file or results record: the description it carries (written by
    training), else the shipped dataset of its name (records written before descriptions were kept)."""
    if record.get("dataset_description"):
        return spec_from_description(record["dataset_description"], f"the record of {record['dataset']}")
    return get_dataset_spec(record["dataset"])


def load_description(path: Path) -> DatasetSpec:
    """Read and check a description file; :class:`DescriptionError` names the file and the bad key."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DescriptionError(f"{path}: dataset description not found; expected a JSON file "
                               "(docs/adding-a-dataset.md)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DescriptionError(f"{path}: not valid JSON ({error})") from None
    return spec_from_description(content, str(path))


def spec_from_description(content: Any, source: str) -> DatasetSpec:
    """A :class:`DatasetSpec` from a description's parsed content; ``source`` names it in errors."""
    check = _Checker(source)
    check.object(content, "", required=("name", "classes", "background", "labels", "folders"),
                 optional=("about", "counts", "download", "synthetic"))
    name = check.string(content["name"], "name")
    if not NAME_PATTERN.match(name):
        check.fail("name", f"{name!r}; expected {NAME_RULE} (it names folders)")
    if "about" in content:
        check.string(content["about"], "about")

    classes = content["classes"]
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        check.fail("classes", f"expected a list of 2 to {MAX_CLASSES} classes, got {classes!r}")
    names, colours = [], []
    for i, entry in enumerate(classes):
        check.object(entry, f"classes[{i}]", required=("name", "colour"))
        names.append(check.string(entry["name"], f"classes[{i}].name"))
        colours.append(check.colour(entry["colour"], f"classes[{i}].colour"))
    check.object(content["background"], "background", required=("colour",), optional=("white_glass",))
    colours.append(check.colour(content["background"]["colour"], "background.colour"))
    for key, values in (("classes[].name", names), ("colours (classes and background)", colours)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            check.fail(key, f"{', '.join(repeated)} given more than once; each must be unique (a mask colour "
                       "must say which class it is)")
    white_glass = content["background"].get("white_glass", False)
    if not isinstance(white_glass, bool):
        check.fail("background.white_glass", f"expected true or false, got {white_glass!r}")

    labels = _label_source(content["labels"], check)
    folders = content["folders"]
    check.object(folders, "folders", required=FOLDER_KEYS)
    for key in FOLDER_KEYS:
        folder = check.string(folders[key], f"folders.{key}")
        if "/" in folder or "\\" in folder or folder in (".", ".."):
            check.fail(f"folders.{key}", f"{folder!r}; expected one folder name, not a path")
    if len({folders[split] for split in SPLITS}) < len(SPLITS) or folders["images"] == folders["masks"]:
        check.fail("folders", "the three split folders, and the images and masks folders, must differ")

    counts = content.get("counts")
    if counts is not None:
        check.object(counts, "counts", required=SPLITS)
        for split in SPLITS:
            if not isinstance(counts[split], int) or isinstance(counts[split], bool) or counts[split] < 1:
                check.fail(f"counts.{split}", f"expected a positive integer, got {counts[split]!r}")
    gdrive_folder = None
    if "download" in content:
        check.object(content["download"], "download", required=("gdrive_folder",))
        gdrive_folder = check.string(content["download"]["gdrive_folder"], "download.gdrive_folder")
    synthetic = _synthetic_style(content["synthetic"], names, check) if "synthetic" in content else None
    if synthetic and (counts or gdrive_folder):
        check.fail("synthetic", "a synthetic dataset is generated: it has no published counts or download")

    return DatasetSpec(name=name, classes=tuple(names), palette=tuple(colours), labels=labels,
                       folders=dict(folders), white_glass=white_glass, counts=dict(counts) if counts else None,
                       gdrive_folder=gdrive_folder, synthetic=synthetic, source=source, description=content)


def _label_source(labels: Any, check: _Checker) -> LabelSource:
    check.object(labels, "labels", required=("from",), optional=("file_name", "separator", "table"))
    kind = labels["from"]
    if kind not in LABEL_SOURCES:
        check.fail("labels.from", f"{kind!r}; expected one of {', '.join(map(repr, LABEL_SOURCES))}")
    if kind == "table":
        check.object(labels, "labels", required=("from", "table"))
        table = check.string(labels["table"], "labels.table")
        if Path(table).is_absolute() or ".." in Path(table).parts or not table.endswith(".csv"):
            check.fail("labels.table", f"{table!r}; expected a .csv file's path inside the dataset folder")
        return LabelSource("table", table=table)
    check.object(labels, "labels", required=("from", "file_name", "separator"))
    pattern = check.string(labels["file_name"], "labels.file_name")
    separator = check.string(labels["separator"], "labels.separator", empty=True)
    if not pattern.startswith("{stem}") or not pattern.endswith("[{label}].png") or pattern.count("{") != 2:
        check.fail("labels.file_name", f"{pattern!r}; expected '{{stem}}', then any fixed text, then "
                   "'[{label}].png', like '{stem}-[{label}].png'")
    if separator not in ("", " "):
        check.fail("labels.separator", f"{separator!r}; expected '' (digits side by side) or ' '")
    return LabelSource("file name", file_name=pattern, separator=separator)


def _synthetic_style(synthetic: Any, classes: list[str], check: _Checker) -> SyntheticStyle:
    check.object(synthetic, "synthetic", required=("stems", "textures"), optional=("imitates",))
    imitates = synthetic.get("imitates")
    if imitates is not None and imitates not in dataset_names():
        check.fail("synthetic.imitates", f"{imitates!r}; expected a shipped dataset: {', '.join(dataset_names())}")
    if synthetic["stems"] not in STEM_STYLES:
        check.fail("synthetic.stems", f"{synthetic['stems']!r}; expected one of {', '.join(STEM_STYLES)}")
    textures = synthetic["textures"]
    check.object(textures, "synthetic.textures", required=tuple(classes))
    for name in classes:
        if textures[name] not in TEXTURES:
            check.fail(f"synthetic.textures.{name}", f"{textures[name]!r}; expected one of {', '.join(TEXTURES)}")
    return SyntheticStyle(imitates, synthetic["stems"], tuple(textures[name] for name in classes))


class _Checker:
    """Type checks of a description's values; each failure names the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, message: str):
        where = f"{self.source}: {key}" if key else self.source
        raise DescriptionError(f"{where}: {message} (docs/adding-a-dataset.md)")

    def object(self, value: Any, key: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
        if not isinstance(value, dict):
            self.fail(key, f"expected a JSON object, got {value!r}")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(key, f"missing {', '.join(map(repr, missing))}")
        unknown = [k for k in value if k not in required and k not in optional]
        if unknown:
            self.fail(key, f"unknown key {', '.join(map(repr, unknown))}; expected "
                      f"{', '.join(map(repr, (*required, *optional)))}")

    def string(self, value: Any, key: str, empty: bool = False) -> str:
        if not isinstance(value, str) or (not value and not empty):
            self.fail(key, f"expected a {'' if empty else 'non-empty '}string, got {value!r}")
        return value

    def colour(self, value: Any, key: str) -> tuple[int, int, int]:
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
            self.fail(key, f"expected an RGB colour [R, G, B] of integers 0..255, got {value!r}")
        return tuple(value)
