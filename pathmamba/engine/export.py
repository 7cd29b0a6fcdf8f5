"""Export a trained model to share it: its weights as safetensors and a JSON model card.

An export folder holds ``model.safetensors`` (the state dict; safetensors stores tensors only, so loading
it runs no code) and ``model_card.json``: what rebuilds and uses the model (method, stage, hyper-parameters,
input size and normalisation, class names and palette) and what describes it (dataset, seed, training
settings, test metrics when ``test_metrics.json`` lies beside the model, the git commit and package
versions it was trained and exported with). ``python -m pathmamba predict --model <folder>`` reads it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pathmamba.core.environment import environment_record
from pathmamba.core.errors import NO_ROOM, InputError, disk_full
from pathmamba.core.files import atomic_write_json, file_sha256, give_ordinary_mode, normalised_path
from pathmamba.core.layout import RUN_RECORD, TEST_METRICS
from pathmamba.core.outputs import check_replaceable, listed_in, new_sibling, put_in_place
from pathmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from pathmamba.data.specs import recorded_spec
from pathmamba.engine.evaluate import load_model
from pathmamba.engine.model_files import build_recorded_model, check_model_record
from pathmamba.engine.registry import get_spec

log = logging.getLogger("pathmamba.engine.export")

WEIGHTS = "model.safetensors"
CARD = "model_card.json"
#: The card's ``format``; ``format_version`` changes when a reader of older cards would misread a new one.
CARD_FORMAT = "pathmamba-model-card"
CARD_VERSION = 1
#: What the export's environment record contributes to the card (no host names, no paths); the training
#: environment adds what ran the training.
_CODE_KEYS = ("pathmamba_version", "git_commit", "git_dirty", "python", "packages")
_TRAINING_KEYS = (*_CODE_KEYS, "device_name", "scan", "precision")


def _json_beside(path: Path) -> dict | None:
    """The JSON object in ``path`` (a record the workflow writes beside model.pt), None when absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"{path}: not valid JSON ({error}); move it away or fix it to export") from None


def _provenance(environment: dict | None, keys: tuple[str, ...]) -> dict | None:
    return None if environment is None else {key: environment.get(key) for key in keys}


def model_card(checkpoint: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """The model card of the ``model.pt`` record ``checkpoint`` read from ``model_path`` (its folder's
    ``run.json`` and ``test_metrics.json`` add the training environment and the test metrics)."""
    spec = recorded_spec(checkpoint)
    method = get_spec(checkpoint["method"], checkpoint.get("stage"))
    run = _json_beside(model_path.parent / RUN_RECORD)
    metrics = _json_beside(model_path.parent / TEST_METRICS)
    size = checkpoint.get("input_size")
    return {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "method": checkpoint["method"],
        "stage": checkpoint.get("stage"),
        "summary": method.summary,
        "supervision": method.supervision,
        "hparams": checkpoint["hparams"],
        "training_settings": checkpoint["settings"],
        "dataset": spec.name,
        "classes": list(spec.classes),
        # Mask index -> name and RGB colour; index 4 is white background, never predicted.
        "palette": [{"index": i, "name": name, "rgb": list(rgb)}
                    for i, (name, rgb) in enumerate(zip([*spec.classes, "background"], spec.palette, strict=True))],
        "input": {"size": {"height": size[0], "width": size[1]} if size else None, "channels": "RGB",
                  "normalisation": "uint8 / 255, then (x - mean) / std per channel",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "output": f"predict(images (B, 3, H, W)) -> scores (B, {spec.num_classes}, H, W), larger is more likely; "
                  "the mask is their argmax over the classes",
        "seed": checkpoint["seed"],
        "best_epoch": checkpoint["epoch"],
        "best_val_mIoU": checkpoint["val_mIoU"],
        "test_metrics": metrics.get("protocols") if metrics else None,
        "trained_with": _provenance(run.get("environment") if run else None, _TRAINING_KEYS),
        "exported_with": _provenance(environment_record(torch.device("cpu")), _CODE_KEYS),
        "source_model": {"path": str(model_path), "sha256": file_sha256(model_path)},
        "files": [WEIGHTS],
    }


def export_model(model_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the export folder of the trained ``model_path`` (a ``model.pt``) to ``out_dir``; returns
    the card. An existing ``out_dir`` is replaced only if it is empty or an export of this tool."""
    model_path, out_dir = Path(model_path), normalised_path(out_dir)
    check_replaceable(out_dir, listed_in(CARD), "an export folder")  # before any work
    checkpoint, model = load_model(model_path)
    card = model_card(checkpoint, model_path)
    building = new_sibling(out_dir, "building")
    try:
        # save_model, not save_file: it stores tensors that share memory (tied weights) once.
        try:
            safetensors.torch.save_model(model, str(building / WEIGHTS), metadata={"format": "pt"},
                                         force_contiguous=True)
        except safetensors.SafetensorError as error:
            if not any(f"(os error {code})" in str(error) for code in NO_ROOM):
                raise
            (building / WEIGHTS).unlink(missing_ok=True)
            needed = sum(tensor.nbytes for tensor in model.state_dict().values())
            raise disk_full(out_dir / WEIGHTS, needed, about=True) from None
        give_ordinary_mode(building / WEIGHTS)  # safetensors creates it private (0600); exports are shared
        card["weights_sha256"] = file_sha256(building / WEIGHTS)
        atomic_write_json(building / CARD, card)
        put_in_place(building, out_dir, listed_in(CARD), "an export folder")
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already after a successful rename
    log.info("exported %s (%s on %s, seed %s) to %s", model_path, card["method"], card["dataset"], card["seed"],
             out_dir)
    return card


def load_export(folder: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """(a record with the ``model.pt`` keys that inference reads: method, stage, hparams, dataset, seed,
    settings, input_size; the model with its weights, on the CPU) of the export ``folder``."""
    folder = Path(folder)
    card_path, weights = folder / CARD, folder / WEIGHTS
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {CARD}; expected a folder written by `python -m pathmamba "
                                "export` or a model.pt") from None
    except ValueError as error:
        raise InputError(f"{card_path}: not valid JSON ({error})") from None
    if card.get("format") != CARD_FORMAT or card.get("format_version") != CARD_VERSION:
        raise InputError(f"{card_path}: not a model card of format {CARD_FORMAT} version {CARD_VERSION}")
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: {WEIGHTS} is missing")
    if file_sha256(weights) != card.get("weights_sha256"):
        raise InputError(f"{weights}: SHA-256 differs from the one in {CARD}; the weights file is damaged or "
                         "belongs to another export")
    try:
        size = card["input"]["size"]
        record = {"method": card["method"], "stage": card["stage"], "hparams": card["hparams"],
                  "dataset": card["dataset"], "seed": card["seed"], "settings": card["training_settings"],
                  "input_size": [size["height"], size["width"]] if size else None}
    except (KeyError, TypeError) as error:
        raise InputError(f"{card_path}: not a complete model card (no {error}); export the model again") from None
    check_model_record(record, card_path, keys=("method", "dataset", "seed", "hparams"))
    model = build_recorded_model(record, card_path)
    try:
        # load_model, not load_file: it restores tensors that save_model stored once for several names.
        safetensors.torch.load_model(model, str(weights), strict=True, device="cpu")
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise InputError(f"{weights}: its weights do not fit the {card['method']} model its card's hparams build "
                         f"({detail})") from None
    return record, model
