"""Facts about the datasets (docs/design.md §3.1): classes, palettes, published counts, file naming.

Synthetic demo datasets share the spec of the real dataset whose layout they imitate, so that every
reader and check written for the real data runs on them too.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 4
NUM_CLASSES = 4


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset's layout and label conventions.

    ``palette`` has five RGB triples: the four tissue classes, then white background (mask index 4).
    ``counts`` are the published numbers of files per split (None for synthetic data).
    ``layout`` is ``"luad"`` or ``"bcss"``: how training file names carry the image-level label.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    layout: str
    counts: dict[str, int] | None = None
    gdrive_folder: str | None = None
    synthetic: bool = False

    @property
    def flat_palette(self) -> list[int]:
        """The palette as PIL's flat list of 768 values (unused entries black)."""
        flat = [value for rgb in self.palette for value in rgb]
        return flat + [0] * (768 - len(flat))

    def train_filename(self, stem: str, label: tuple[int, ...]) -> str:
        """A training file name carrying ``label`` in this dataset's own pattern."""
        digits = "".join(str(int(v)) for v in label)
        if self.layout == "luad":
            return f"{stem}-[{' '.join(digits)}].png"
        return f"{stem}+0[{digits}].png"


LUAD_CLASSES = ("TE", "NEC", "LYM", "TAS")
LUAD_PALETTE = ((205, 51, 51), (0, 255, 0), (65, 105, 225), (255, 165, 0), (255, 255, 255))
BCSS_CLASSES = ("TUM", "STR", "LYM", "NEC")
BCSS_PALETTE = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255))

DATASETS: dict[str, DatasetSpec] = {
    "luad-histoseg": DatasetSpec(
        "luad-histoseg", LUAD_CLASSES, LUAD_PALETTE, "luad",
        counts={"training": 16678, "val": 300, "test": 307},
        gdrive_folder="1E3Yei3Or3xJXukHIybZAgochxfn6FJpr",
    ),
    "bcss-wsss": DatasetSpec(
        "bcss-wsss", BCSS_CLASSES, BCSS_PALETTE, "bcss",
        counts={"training": 23422, "val": 3418, "test": 4986},
        gdrive_folder="1iS2Z0DsbACqGp7m6VDJbAcgzeXNEFr77",
    ),
    "synthetic-luad": DatasetSpec("synthetic-luad", LUAD_CLASSES, LUAD_PALETTE, "luad", synthetic=True),
    "synthetic-bcss": DatasetSpec("synthetic-bcss", BCSS_CLASSES, BCSS_PALETTE, "bcss", synthetic=True),
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name raises ``KeyError`` listing the valid names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}") from None
