"""Segment new images with a trained model (``model.pt`` or an export folder): ``python -m pathmamba predict``.

Every image is segmented in tiles of the model's training size: an image of that size is one tile, a
larger one (a slide region as a big PNG or TIFF) overlapping tiles whose scores are blended with a
linear ramp window, so that tile borders, where a model sees the least context, weigh least; the output
has the input's size. A side shorter than the tile is padded by mirroring and cropped back. Images of
any common bit depth are read as the 8-bit RGB they stand for (16-bit gray scaled, not clipped); one
with transparent pixels or of another mode is refused naming the file and mode (:func:`read_input_image`).

The output folder holds, per input image ``<stem>.<ext>``: ``masks/<stem>.png`` (palette PNG in the
dataset's colours, class indices 0..K-1), ``overlays/<stem>.png`` (the mask's colours over the image);
``classes.csv`` (one row per image: size, tiles, and per class the share of the image's pixels predicted
as that class) and ``predict.json`` (the model, the settings, the files). The registry's protocol gives
pixel scores only, whose scale differs between methods, so the image-level value is the class's share
of the predicted mask, the same quantity for every method.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pathmamba.core.devices import autocast
from pathmamba.core.errors import InputError
from pathmamba.core.files import atomic_write_json, atomic_write_text, csv_text, normalised_path
from pathmamba.core.outputs import check_replaceable, listed_in, new_sibling, put_in_place
from pathmamba.core.progress import ProgressLog
from pathmamba.data.datasets import normalised_batch, to_chw
from pathmamba.data.specs import recorded_spec
from pathmamba.engine.evaluate import inference_setup, load_model, overlay_mask, save_palette_mask
from pathmamba.engine.export import CARD, load_export

log = logging.getLogger("pathmamba.engine.predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
RECORD = "predict.json"
WHAT = "a prediction folder"
#: Opacity of the mask's colours in the overlays.
OVERLAY_ALPHA = 0.4
#: Image modes that PIL converts to 8-bit RGB without loss of meaning: 8 (or 1) bits per channel, or a
#: colour space with a defined RGB conversion.
CONVERTED_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")
#: 16-bit gray modes (PNG, TIFF), which PIL's own conversion to RGB clips at 255.
GRAY_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
#: Modes with an alpha channel: read only when every pixel is opaque.
ALPHA_MODES = ("RGBA", "LA", "PA")



def load_any(model: Path) -> tuple[dict, torch.nn.Module]:
    """(record, model on the CPU) of a ``model.pt`` file or an export folder (:func:`pathmamba.engine.export.load_export`)."""
    model = Path(model)
    if model.is_dir():
        return load_export(model)
    if not model.is_file():
        raise FileNotFoundError(f"--model {model}: no such file or folder; expected a model.pt or an export "
                                f"folder (with {CARD})")
    return load_model(model)


def input_images(source: Path) -> list[Path]:
    """The images to segment: ``source`` itself, or the files of folder ``source`` with an image suffix
    (not its sub-folders), sorted by name. Two with the same stem would write the same outputs: an error."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source}: no such file or folder")
    images = sorted(path for path in source.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InputError(f"--input {source}: no images in it (suffixes {', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for path in images:
        if (other := stems.setdefault(path.stem, path)) != path:
            raise InputError(f"--input {source}: {other.name} and {path.name} would write the same outputs "
                             f"({path.stem}.png); rename one")
    return images


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``length`` px, neighbours sharing at least ``overlap``
    px, spread evenly, the first at 0 and the last ending at ``length`` (a single 0 when ``length <= tile``)."""
    if length <= tile:
        return [0]
    count = -(-(length - tile) // (tile - overlap)) + 1  # ceil division
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp(size: int, overlap: int) -> torch.Tensor:
    """(size,) weights rising linearly over the first ``overlap`` px from 1/(overlap+1) to 1 and falling
    over the last ones alike; never 0, so a pixel covered by one tile only keeps that tile's scores."""
    distance = torch.minimum(torch.arange(size), torch.arange(size).flip(0)).float()
    return ((distance + 1) / (overlap + 1)).clamp(max=1.0)


@dataclass
class _Canvas:
    """One image being segmented: its blended scores accumulate tile by tile."""

    path: Path
    image: np.ndarray  # (H, W, 3) uint8, padded to at least the tile size
    height: int  # the input's size, before padding
    width: int
    tiles: list[tuple[int, int]]
    # (C, H_pad, W_pad) float32, weighted sum of tile scores; C the model's classes, set by the first tile
    scores: torch.Tensor | None = field(init=False, default=None)
    weight: torch.Tensor = field(init=False)  # (H_pad, W_pad) float32, sum of tile weights
    pending: int = field(init=False)

    def __post_init__(self):
        self.weight = torch.zeros(self.image.shape[:2])
        self.pending = len(self.tiles)


def default_overlap(tile: tuple[int, int]) -> tuple[int, int]:
    """A quarter of the tile: the ramp then spans a quarter of each tile side."""
    return tile[0] // 4, tile[1] // 4


def tile_grid(height: int, width: int, tile: tuple[int, int], overlap: tuple[int, int]) -> list[tuple[int, int]]:
    """(y, x) starts of the tiles of an image of ``height`` x ``width`` px (padded up to the tile size)."""
    return [(y, x) for y in tile_starts(max(height, tile[0]), tile[0], overlap[0])
            for x in tile_starts(max(width, tile[1]), tile[1], overlap[1])]


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of the image file ``path``, from its header; an unreadable file, or one of a mode
    that :func:`read_input_image` refuses, is an InputError."""
    try:
        with Image.open(path) as image:
            if image.mode not in (*CONVERTED_MODES, *GRAY_16_BIT_MODES, *ALPHA_MODES):
                raise InputError(unreadable_mode(path, image.mode))
            return image.height, image.width
    except (OSError, Image.DecompressionBombError) as error:  # OSError includes UnidentifiedImageError
        raise InputError(f"{path}: cannot read it as an image ({error})") from None


def unreadable_mode(path: Path, mode: str) -> str:
    """The message refusing an image of ``mode``."""
    return (f"{path}: image mode {mode}; predict reads 8-bit RGB, gray (L) or palette (P) images, 16-bit gray, and "
            "RGBA or LA without transparency")


def read_input_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image to segment, of any common bit depth: 8-bit gray, palette, RGB and
    other 8-bit colour spaces through PIL; 16-bit gray scaled to 8 bits (round(v * 255 / 65535)); an
    alpha channel (RGBA, LA, a palette's transparent colour) only when every pixel is opaque, since what
    lies under a transparent pixel is not in the image. Any other mode (32-bit integers, floats, a
    transparent pixel) is an :class:`InputError` naming the file and the mode, never a misread image."""
    with Image.open(path) as image:
        mode = image.mode
        if mode in GRAY_16_BIT_MODES:
            gray = np.asarray(image).astype(np.uint32)
            return np.repeat(((gray * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
        if mode == "P" and "transparency" in image.info:
            image, mode = image.convert("RGBA"), "P with a transparent colour"
        if image.mode in ALPHA_MODES:
            transparent = np.argwhere(np.asarray(image.getchannel("A")) < 255)
            if len(transparent):
                row, column = transparent[0]
                raise InputError(f"{path}: image mode {mode} with transparent pixels ({len(transparent)}, the "
                                 f"first at row {row}, column {column}); what lies under them is not in the image: "
                                 "save it without transparency (flattened onto its background)")
            return np.asarray(image.convert("RGB"))
        if mode in CONVERTED_MODES:
            return np.asarray(image if mode == "RGB" else image.convert("RGB"))
    raise InputError(unreadable_mode(path, mode))


def _canvas(path: Path, tile: tuple[int, int], overlap: tuple[int, int]) -> _Canvas:
    try:
        image = read_input_image(path)
    except (OSError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: cannot read it as an image ({error})") from None
    height, width = image.shape[:2]
    pad = ((0, max(0, tile[0] - height)), (0, max(0, tile[1] - width)), (0, 0))
    if any(after for _, after in pad):
        image = np.pad(image, pad, mode="symmetric")
    return _Canvas(path, image, height, width, tile_grid(height, width, tile, overlap))


@torch.no_grad()
def segment(model: torch.nn.Module, paths: list[Path], tile: tuple[int, int], device: torch.device,
            precision: str = "fp32", batch_size: int = 16, overlap: tuple[int, int] | None = None,
            on_tiles=None):
    """Yield (canvas, scores (C, H, W) float32, mask (H, W) int64) per image of ``paths``, in order, each at
    its input's size. Tiles of (height, width) ``tile`` px overlap by ``overlap`` px (default
    :func:`default_overlap`); batches of ``batch_size`` tiles may mix images, so a folder of small images
    runs in full batches. ``on_tiles(n)`` is called after each batch of ``n`` tiles."""
    overlap = overlap or default_overlap(tile)
    window = ramp(tile[0], overlap[0])[:, None] * ramp(tile[1], overlap[1])[None, :]  # (h, w)
    model.eval()
    batch: list[tuple[_Canvas, int, int]] = []
    in_flight: list[_Canvas] = []

    def run_batch():
        # uint8 to the device, normalised there: a quarter of the bytes of float32 tiles
        tiles = torch.stack([to_chw(canvas.image[y:y + tile[0], x:x + tile[1]]) for canvas, y, x in batch])
        images = normalised_batch(tiles, device)
        with autocast(device, precision):
            scores = model.predict(images).float().cpu()
        for (canvas, y, x), tile_scores in zip(batch, scores, strict=True):
            if canvas.scores is None:
                canvas.scores = torch.zeros(tile_scores.shape[0], *canvas.image.shape[:2])
            canvas.scores[:, y:y + tile[0], x:x + tile[1]] += tile_scores * window
            canvas.weight[y:y + tile[0], x:x + tile[1]] += window
            canvas.pending -= 1
        if on_tiles is not None:
            on_tiles(len(batch))
        batch.clear()

    def finished():
        while in_flight and in_flight[0].pending == 0:
            canvas = in_flight.pop(0)
            scores = (canvas.scores / canvas.weight)[:, :canvas.height, :canvas.width]
            yield canvas, scores, scores.argmax(0)

    for path in paths:
        canvas = _canvas(path, tile, overlap)
        in_flight.append(canvas)
        for y, x in canvas.tiles:
            batch.append((canvas, y, x))
            if len(batch) == batch_size:
                run_batch()
                yield from finished()
    if batch:
        run_batch()
    yield from finished()


def predict(model_path: Path, source: Path, out_dir: Path, device: str = "auto", batch_size: int = 16,
            tile_size: int | None = None, scan: str | None = None, precision: str | None = None) -> list[dict]:
    """Segment the image ``source`` (or every image in folder ``source``) with ``model_path`` (a
    ``model.pt`` or an export folder) into the new folder ``out_dir`` (layout in the module docstring);
    returns the rows of ``classes.csv``. ``tile_size``: square tiles of that side instead of the model's
    training size (which models trained before it was recorded need). ``scan``, ``precision``: see
    :func:`pathmamba.engine.evaluate.inference_setup`."""
    out_dir = normalised_path(out_dir)
    check_replaceable(out_dir, listed_in(RECORD), WHAT)  # before any work
    paths = input_images(source)
    sizes = [image_size(path) for path in paths]  # every input readable, before the model loads
    record, model = load_any(model_path)
    size = [tile_size, tile_size] if tile_size else record.get("input_size")
    if not size:
        raise InputError(f"--model {model_path}: it does not record its training image size (trained before "
                         "that was recorded); give --tile-size, e.g. 224 for the published datasets")
    tile = (int(size[0]), int(size[1]))
    spec = recorded_spec(record)
    torch_device, precision, environment = inference_setup(record, device, scan, precision)
    model.to(torch_device)
    tiles = sum(len(tile_grid(height, width, tile, default_overlap(tile))) for height, width in sizes)
    log.info("predicting %d image(s), %d tile(s) of %dx%d px, with %s (%s, seed %s)", len(paths), tiles,
             tile[1], tile[0], record["method"], spec.name, record["seed"])
    building = new_sibling(out_dir, "building")
    rows, files = [], []
    try:
        (building / "masks").mkdir()
        (building / "overlays").mkdir()
        progress = ProgressLog(log, "tiles", tiles)
        started = time.time()
        for canvas, _, mask in segment(model, paths, tile, torch_device, precision, batch_size,
                                       on_tiles=progress.update):
            mask = mask.numpy()
            name = f"{canvas.path.stem}.png"
            save_palette_mask(mask, spec.flat_palette, building / "masks" / name)
            image = canvas.image[:canvas.height, :canvas.width]
            Image.fromarray(overlay_mask(image, mask, spec.palette, OVERLAY_ALPHA)).save(building / "overlays" / name)
            files += [f"masks/{name}", f"overlays/{name}"]
            shares = np.bincount(mask.ravel(), minlength=spec.num_classes) / mask.size
            rows.append({"image": canvas.path.name, "width": canvas.width, "height": canvas.height,
                         "tiles": len(canvas.tiles), "mask": f"masks/{name}",
                         **{f"share_{c}": round(float(s), 6) for c, s in zip(spec.classes, shares, strict=True)}})
        atomic_write_text(building / "classes.csv", csv_text(rows))
        atomic_write_json(building / RECORD, {
            "model": str(model_path), "method": record["method"], "stage": record.get("stage"),
            "dataset": spec.name, "seed": record["seed"], "classes": list(spec.classes), "input": str(source),
            "tile": {"height": tile[0], "width": tile[1]}, "images": len(rows),
            "seconds": round(time.time() - started, 2), "environment": environment,
            "files": [*files, "classes.csv"]})
        put_in_place(building, out_dir, listed_in(RECORD), WHAT)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already after a successful rename
    log.info("wrote masks, overlays and classes.csv of %d image(s) to %s", len(rows), out_dir)
    return rows
