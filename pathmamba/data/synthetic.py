"""Synthetic H&E-like datasets in the layout of their descriptions (docs/design.md §3.5): the demo's two,
in the published datasets' layouts, and any description with a ``synthetic`` entry.

Each patch is a random partition of the image into one region per chosen tissue class (1-3 classes),
plus sometimes a white-background region. Every tissue class has its own procedural texture, drawn
as haematoxylin (H, purple) and eosin (E, pink) stain concentrations and turned into RGB with the
Beer-Lambert law, so colours look like H&E and the classes differ both in colour statistics and in
texture:

    tumour epithelium (TE / TUM)  large, rim-stained purple nuclei packed on pink cytoplasm
    necrosis (NEC)                pale mottled pink with small fragmented debris dots
    lymphocytes (LYM)             dense small round very dark nuclei
    stroma (TAS / STR)            wavy bright-pink fibres with a few thin spindle nuclei

Each class of a description is drawn with the texture its ``synthetic.textures`` names. Training images
carry the set of classes covering at least ``MIN_FRACTION`` of the pixels in their file name or in the
label table; val/test images get P-mode masks (indices 0..K-1 tissue, K white background).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from pathmamba.data.readers import TABLE_IMAGE_COLUMN
from pathmamba.data.specs import SPLITS, DatasetSpec, get_dataset_spec

# A tissue class is in an image-level label when it covers at least this share of the pixels.
MIN_FRACTION = 0.03
# Each region of a partition must cover at least this share, so that every drawn class is comfortably
# above MIN_FRACTION and the image label is exactly the set of drawn classes.
MIN_REGION_FRACTION = 0.06
BACKGROUND_PROBABILITY = 0.3
# Probability of 1, 2 or 3 tissue classes in a patch.
CLASSES_PER_PATCH = (0.35, 0.40, 0.25)
# How often each tissue is drawn: tumour and stroma dominate both real training sets.
TISSUE_WEIGHT = {"tumour": 0.40, "stroma": 0.30, "lymphocyte": 0.18, "necrosis": 0.12}
# Optical density of unit H and E concentration in (R, G, B): Macenko et al.'s reference stain vectors.
H_STAIN = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
E_STAIN = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)
# Texture lengths (nucleus radii, fibre spacing) are given for 224 px patches and scaled with the size,
# so a smaller demo patch shows the same tissue at a lower resolution.
REFERENCE_SIZE = 224
MIN_SIZE = 32


@cache
def _upsampler(size: int, grid: int) -> np.ndarray:
    """(size, grid + 2) Gaussian weights that turn (grid + 2)^2 white noise into a smooth size^2 field.

    One extra noise node on each side keeps the field as smooth at the borders as in the middle; rows
    are scaled to unit norm so the field has unit variance everywhere.
    """
    spacing = size / grid
    centres = (np.arange(-1, grid + 1) + 0.5) * spacing
    x = np.arange(size) + 0.5
    weights = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / spacing) ** 2)
    weights /= np.sqrt((weights**2).sum(axis=1, keepdims=True))
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def _smooth_noise(rng: np.random.Generator, size: int, grid: int, n: int = 1) -> np.ndarray:
    """(n, size, size) float32 smooth Gaussian noise, unit variance, ``grid`` blobs across the patch."""
    w = _upsampler(size, grid)
    nodes = rng.standard_normal((n, grid + 2, grid + 2), dtype=np.float32)
    return w @ nodes @ w.T


@cache
def _coordinates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre row and column coordinates, each (size, size) float32."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    y.setflags(write=False)
    x.setflags(write=False)
    return y, x


def _nuclei(
    rng: np.random.Generator,
    size: int,
    count: int,
    radius: float,
    elongation: tuple[float, float] = (1.0, 1.0),
    angle: float | None = None,
    rim: float = 0.0,
) -> np.ndarray:
    """(size, size) float32 nuclear stain in [0, 1]: ``count`` ellipses at random places, 0 elsewhere.

    ``radius`` is the minor semi-axis in pixels (jittered by +-20%), the major one is ``elongation``
    times longer; ``angle`` orients all ellipses alike (with a little jitter) or, if None, at random.
    ``rim`` > 0 makes the edge darker than the centre, like vesicular tumour nuclei. All ellipses are
    stamped at once with fancy indexing; positions wrap around the patch border.
    """
    centres = rng.uniform(0, size, (count, 2)).astype(np.float32)
    minor = np.maximum(radius * rng.uniform(0.8, 1.2, count), 0.7).astype(np.float32)
    major = minor * rng.uniform(*elongation, count).astype(np.float32)
    if angle is None:
        angles = rng.uniform(0, np.pi, count)
    else:
        angles = angle + rng.normal(0, 0.15, count)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    reach = int(np.ceil(major.max()))
    offsets = np.arange(-reach, reach + 1)
    dy, dx = (a.ravel() for a in np.meshgrid(offsets, offsets, indexing="ij"))
    rows = np.floor(centres[:, :1]).astype(np.int64) + dy  # (count, K) pixels around each centre
    cols = np.floor(centres[:, 1:]).astype(np.int64) + dx
    ry = rows + 0.5 - centres[:, :1]  # offset of each pixel centre from the nucleus centre
    rx = cols + 0.5 - centres[:, 1:]
    u = (rx * cos[:, None] + ry * sin[:, None]) / major[:, None]
    v = (ry * cos[:, None] - rx * sin[:, None]) / minor[:, None]
    d2 = u * u + v * v
    inside = d2 <= 1.0

    stain = np.zeros(size * size, dtype=np.float32)
    flat = (rows % size) * size + cols % size
    stain[flat[inside]] = 1.0 - rim * (1.0 - d2[inside])
    return stain.reshape(size, size)


def _tumour(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = size / REFERENCE_SIZE
    nuclei = _nuclei(rng, size, 150, 6.5 * scale, elongation=(1.0, 1.6), rim=0.4)
    eosin = 0.55 + 0.08 * _smooth_noise(rng, size, 8)[0]
    return 0.15 + 0.95 * nuclei, eosin * (1.0 - 0.5 * nuclei)


def _necrosis(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = size / REFERENCE_SIZE
    debris = _nuclei(rng, size, 300, 1.5 * scale, elongation=(1.0, 2.0))
    mottle = _smooth_noise(rng, size, 6)[0] + 0.6 * _smooth_noise(rng, size, 28)[0]
    return 0.06 + 0.5 * debris, 0.24 + 0.06 * mottle


def _lymphocyte(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = size / REFERENCE_SIZE
    nuclei = _nuclei(rng, size, 1100, 3.0 * scale, elongation=(1.0, 1.1))
    eosin = 0.3 + 0.04 * _smooth_noise(rng, size, 8)[0]
    return 0.1 + 1.9 * nuclei, eosin * (1.0 - 0.6 * nuclei)


def _stroma(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    scale = size / REFERENCE_SIZE
    y, x = _coordinates(size)
    across = rng.uniform(0, np.pi)  # direction across the fibres; fibres run perpendicular to it
    wavelength = max(9.0 * scale, 3.0)
    phase = 2 * np.pi * (x * np.cos(across) + y * np.sin(across)) / wavelength
    warp = 4.0 * _smooth_noise(rng, size, 5)[0] + 1.0 * _smooth_noise(rng, size, 14)[0]
    fibre = (0.5 + 0.5 * np.sin(phase + warp)) ** 2  # wavy bright bands in [0, 1]
    breaks = np.clip(0.7 + 0.4 * _smooth_noise(rng, size, 10)[0], 0, 1)  # fibres fade in and out
    nuclei = _nuclei(rng, size, 30, 1.8 * scale, elongation=(3.0, 4.5), angle=across + np.pi / 2)
    eosin = 0.4 + 0.5 * fibre * breaks + 0.04 * _smooth_noise(rng, size, 12)[0]
    return 0.05 + 0.9 * nuclei, eosin * (1.0 - 0.5 * nuclei)


TEXTURES = {"tumour": _tumour, "necrosis": _necrosis, "lymphocyte": _lymphocyte, "stroma": _stroma}


def _choose_classes(rng: np.random.Generator, spec: DatasetSpec, forced: tuple[int, ...]) -> list[int]:
    """Sorted tissue classes of one patch: ``forced`` plus random ones, 1-3 in all (more if forced; at
    most all of the dataset's classes)."""
    count = min(int(rng.choice(len(CLASSES_PER_PATCH), p=CLASSES_PER_PATCH)) + 1, spec.num_classes)
    missing = count - len(forced)
    if missing <= 0:
        return sorted(forced)
    rest = [c for c in range(spec.num_classes) if c not in forced]
    weights = np.array([TISSUE_WEIGHT[spec.synthetic.textures[c]] for c in rest])
    extra = rng.choice(rest, size=missing, replace=False, p=weights / weights.sum())
    return sorted(set(forced) | {int(c) for c in extra})


def _partition(rng: np.random.Generator, size: int, regions: int) -> np.ndarray:
    """(size, size) int64 region ids 0..regions-1, each region covering >= MIN_REGION_FRACTION.

    The argmax of one smooth random field per region gives organic blob-shaped regions; a little
    finer noise roughens their borders. Draws again until every region is large enough.
    """
    while True:
        fields = _smooth_noise(rng, size, 3, regions) + 0.2 * _smooth_noise(rng, size, 16, regions)
        ids = fields.argmax(axis=0)
        shares = np.bincount(ids.ravel(), minlength=regions) / ids.size
        if shares.min() >= MIN_REGION_FRACTION:
            return ids


def make_patch(
    rng: np.random.Generator, spec: DatasetSpec, size: int, forced: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch: image (size, size, 3) uint8 RGB and mask (size, size) uint8 in 0..K (K background).

    ``forced`` tissue classes are always drawn (used to make every class occur in every split).
    """
    classes = _choose_classes(rng, spec, forced)
    if rng.random() < BACKGROUND_PROBABILITY:
        classes.append(spec.background)
    mask = np.array(classes, dtype=np.uint8)[_partition(rng, size, len(classes))]

    # Glass: almost no stain, so background is near-white after the noise below.
    hema = np.full((size, size), 0.01, dtype=np.float32)
    eosin = np.full((size, size), 0.03, dtype=np.float32)
    for c in classes:
        if c == spec.background:
            continue
        region = mask == c
        h, e = TEXTURES[spec.synthetic.textures[c]](rng, size)
        hema[region] = h[region]
        eosin[region] = e[region]

    # Stain strength varies from slide to slide; pixel noise stands in for camera noise.
    h_stain = H_STAIN * rng.uniform(0.9, 1.1)
    e_stain = E_STAIN * rng.uniform(0.9, 1.1)
    density = hema[..., None] * h_stain + eosin[..., None] * e_stain
    density += 0.03 * rng.standard_normal((size, size, 3), dtype=np.float32)
    image = np.clip(255.0 * np.exp(-density) + 0.5, 0, 255).astype(np.uint8)
    return image, mask


def label_from_mask(mask: np.ndarray, num_classes: int, min_fraction: float = MIN_FRACTION) -> tuple[int, ...]:
    """Image-level label (``num_classes`` of 0/1) of a mask (H, W): tissue classes covering >= ``min_fraction``."""
    shares = np.bincount(mask.ravel(), minlength=num_classes + 1)[:num_classes] / mask.size
    return tuple(int(share >= min_fraction) for share in shares)


def _stem(rng: np.random.Generator, spec: DatasetSpec, slides: list[str]) -> str:
    """A file stem in the description's style, on one of ``slides``."""
    slide = slides[int(rng.integers(len(slides)))]
    if spec.synthetic.stems == "patient-x-y":
        x, y = rng.integers(0, 3000, 2) * 20
        return f"{slide}-{x}-{y}"
    x, y = rng.integers(5000, 90000, 2)
    return f"{slide}_xmin{x}_ymin{y}_MPP-0.2500"


def _slides(rng: np.random.Generator, spec: DatasetSpec, count: int = 12) -> list[str]:
    """Slide ids in the description's style: LUAD patient numbers, BCSS TCGA diagnostic-slide barcodes."""
    if spec.synthetic.stems == "patient-x-y":
        return [str(n) for n in rng.integers(1_000_000, 1_100_000, count)]
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    return [f"TCGA-{''.join(rng.choice(alphabet, 2))}-{''.join(rng.choice(alphabet, 4))}-DX1"
            for _ in range(count)]


def generate_patches(
    spec: DatasetSpec, split: str, n: int, size: int = REFERENCE_SIZE, seed: int = 0
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """The ``n`` patches of one split as (unique file stem, image (size, size, 3) uint8, mask (size, size)).

    Deterministic in (description, split, n, size, seed). Image i < K is forced to contain the classes
    c with c % n == i, so every class occurs in every split, however small.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    slides = _slides(rng, spec)
    seen: set[str] = set()
    for i in range(n):
        stem = _stem(rng, spec, slides)
        while stem in seen:
            stem = _stem(rng, spec, slides)
        seen.add(stem)
        forced = tuple(c for c in range(spec.num_classes) if c % n == i)
        image, mask = make_patch(rng, spec, size, forced)
        yield stem, image, mask


def _write_split(root: Path, spec: DatasetSpec, split: str, n: int, size: int, seed: int) -> None:
    folder = root / spec.folders[split]
    if split == "training":
        folder.mkdir()
        table = []
    else:
        (folder / spec.folders["images"]).mkdir(parents=True)
        (folder / spec.folders["masks"]).mkdir()
    for stem, image, mask in generate_patches(spec, split, n, size, seed):
        if split == "training":
            label = label_from_mask(mask, spec.num_classes)
            name = spec.train_filename(stem, label)
            Image.fromarray(image).save(folder / name)
            table.append([name, *label])
            continue
        Image.fromarray(image).save(folder / spec.folders["images"] / f"{stem}.png")
        indexed = Image.fromarray(mask)
        indexed.putpalette(spec.flat_palette)  # turns the L image into a P-mode one, as published
        indexed.save(folder / spec.folders["masks"] / f"{stem}.png")
    if split == "training" and spec.labels.kind == "table":
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([[TABLE_IMAGE_COLUMN, *spec.classes], *table])
        (root / spec.labels.table).parent.mkdir(parents=True, exist_ok=True)
        (root / spec.labels.table).write_text(text.getvalue(), encoding="utf-8")


def make_synthetic_dataset(
    dataset: str | Path, out: Path, n_train: int, n_val: int, n_test: int, size: int = REFERENCE_SIZE,
    seed: int = 0
) -> dict[str, int]:
    """Write the synthetic dataset ``dataset`` (a shipped name or a description file's path; its
    description has a ``synthetic`` entry) to the folder ``out``.

    Laid out as its description says; the demo's two exactly as the published datasets:
    ``out/training/*.png`` (label in the file name), ``out/val/img``, ``out/val/mask``, ``out/test/img``,
    ``out/test/mask`` (P-mode masks named like their images). The dataset is built in a temporary
    sibling folder and renamed to ``out`` at the end, so ``out`` is either complete or absent. Returns the
    number of files per split.
    """
    spec = get_dataset_spec(dataset)
    name = spec.name
    if not spec.synthetic:
        raise ValueError(f"{name!r} is a real dataset; expected a description with a 'synthetic' entry, like "
                         "synthetic-luad's")
    counts = {"training": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if n < 1:
            raise ValueError(f"{name}: {n} {split} images requested; expected at least 1 per split")
    if size < MIN_SIZE:
        raise ValueError(f"{name}: image size {size}; expected at least {MIN_SIZE} px so nuclei stay visible")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it to generate {name} again")

    # A hidden sibling on the same file system, so the final rename is atomic; named by process so
    # that a leftover of a killed run never clashes. mkdir (unlike mkdtemp) honours the umask.
    building = out.parent / f".{out.name}.building-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Made inside the try: a stop signal that lands just after the mkdir still removes it.
        building.mkdir()
        for split, n in counts.items():
            _write_split(building, spec, split, n, size, seed)
        building.rename(out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return counts


def published_copy(canonical: Path, outer: Path, spec: DatasetSpec, train_folder: str = "training",
                   rgb_masks: int | None = None, unpaired_test_image: bool = True) -> Path:
    """The dataset ``canonical`` (canonical layout) copied as downloads of the real datasets look, into
    the new folder ``outer``; returns ``outer``.

    The splits sit in a nested top folder of the same name, ``outer/<outer.name>/``; the training images
    in ``train_folder`` (the real datasets: ``training``; ``train`` in some copies); the first
    ``rgb_masks`` masks (val, then test, by name; None: all) saved as RGB images in the dataset's palette
    instead of P mode; with ``unpaired_test_image``, one more test image without a mask, named after the
    first test image (``...-unpaired.png``, the first one mirrored).
    """
    folders = spec.folders
    inner = Path(shutil.copytree(canonical, Path(outer) / Path(outer).name))
    if train_folder != folders["training"]:
        (inner / folders["training"]).rename(inner / train_folder)
    masks = [mask for split in ("val", "test")
             for mask in sorted((inner / folders[split] / folders["masks"]).glob("*.png"))]
    for mask in masks[:rgb_masks]:
        indices = np.asarray(Image.open(mask))
        Image.fromarray(np.array(spec.palette, dtype=np.uint8)[indices]).save(mask)
    if unpaired_test_image:
        first = min((inner / folders["test"] / folders["images"]).glob("*.png"))
        mirrored = np.asarray(Image.open(first))[:, ::-1]
        Image.fromarray(np.ascontiguousarray(mirrored)).save(first.with_name(f"{first.stem}-unpaired.png"))
    return Path(outer)


def zip_folder(folder: Path, archive: Path, members: str = "*") -> Path:
    """A zip of ``folder`` (the folder itself the top entry), only paths matching ``members``; returns
    ``archive``."""
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(Path(folder).rglob(members)):
            if path.is_file():
                handle.write(path, path.relative_to(Path(folder).parent))
    return archive
