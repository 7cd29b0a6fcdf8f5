"""Checks of a trained model's file on load (``model.pt`` of ``train``, an export folder's card and
weights): the method and dataset against the registries, the architecture keywords against the builder,
the input size, and every tensor's name and shape against the model those keywords build. A mismatch
is one :class:`InputError` naming the file and the first thing that does not fit, never a traceback
from deep inside the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pathmamba.core.errors import InputError
from pathmamba.data.specs import DescriptionError, dataset_names, recorded_spec
from pathmamba.engine.config import keyword_problems, without_weights_files
from pathmamba.engine.registry import build_method, get_spec, method_names

#: The keys of a ``model.pt`` record that loading it needs.
MODEL_KEYS = ("method", "dataset", "seed", "hparams", "state_dict")


def check_model_record(record: Any, path: Path, keys: tuple[str, ...] = MODEL_KEYS) -> None:
    """Raise :class:`InputError` naming ``path`` unless ``record`` (a ``model.pt``'s content, or an export's
    card read as one) has ``keys``, a registered method and stage, a known dataset, hparams its builder
    takes, and an input size of two sides >= 1 (or none)."""
    if not isinstance(record, dict) or (lacking := [key for key in keys if key not in record]):
        what = f"it lacks {', '.join(lacking)}" if isinstance(record, dict) else f"it holds a {type(record).__name__}"
        raise InputError(f"{path}: not a model file written by `train` ({what})")
    method, stage = record["method"], record.get("stage")
    if method not in method_names() or stage not in (None, 1) or (stage == 1 and get_spec(method).stage1 is None):
        raise InputError(f"{path}: method {method!r} stage {stage!r} is not a registered method; registered "
                         f"methods: {', '.join(method_names())}")
    try:
        recorded_spec(record)
    except KeyError:
        raise InputError(f"{path}: dataset {record['dataset']!r} is unknown; known datasets: "
                         f"{', '.join(dataset_names())} (and the file carries no description of it)") from None
    except DescriptionError as error:
        raise InputError(f"{path}: the dataset description it carries is not valid: {error}") from None
    if not isinstance(record["hparams"], dict):
        raise InputError(f"{path}: hparams {record['hparams']!r}; expected a mapping of the builder's keywords")
    preset = get_spec(method, stage).preset
    problems = keyword_problems(method, stage, {key: value for key, value in record["hparams"].items()
                                                if key not in preset}, "hparams")
    if fixed := sorted(set(record["hparams"]) & set(preset)):
        problems.append(f"hparams.{fixed[0]}: fixed by {method}'s registry preset, not a keyword of the file")
    if problems:
        raise InputError(f"{path}: {problems[0]}")
    size = record.get("input_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2
                                 and all(isinstance(side, int) and not isinstance(side, bool) and side >= 1
                                         for side in size)):
        raise InputError(f"{path}: input_size {size!r}; expected [height, width], two integers >= 1")


def build_recorded_model(record: dict[str, Any], path: Path) -> torch.nn.Module:
    """The model of the checked ``record`` (:func:`check_model_record`), built on the CPU without the
    weights files its hparams name (the file's weights replace them all)."""
    try:
        return build_method(record["method"], num_classes=recorded_spec(record).num_classes, stage=record.get("stage"),
                            **without_weights_files(record["hparams"]))
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: its hparams do not build a {record['method']} model ({error})") from None


def weights_mismatch(model: torch.nn.Module, state_dict: Any) -> str | None:
    """What in ``state_dict`` does not fit ``model``: the first missing or unexpected tensor name, or the
    first tensor of another shape (None: every name and shape fits)."""
    if not isinstance(state_dict, dict):
        return f"its weights are a {type(state_dict).__name__}, not a mapping of tensor names to tensors"
    expected = model.state_dict()
    if missing := [name for name in expected if name not in state_dict]:
        return f"tensor {missing[0]} is missing ({len(missing)} of {len(expected)} missing)"
    if unexpected := [name for name in state_dict if name not in expected]:
        return f"tensor {unexpected[0]} is not one of the model's ({len(unexpected)} such)"
    for name, tensor in expected.items():
        found = state_dict[name]
        if not isinstance(found, torch.Tensor):
            return f"{name} is a {type(found).__name__}, not a tensor"
        if found.shape != tensor.shape:
            return f"tensor {name} has shape {tuple(found.shape)}, the model's {tuple(tensor.shape)}"
    return None


def load_checked_weights(model: torch.nn.Module, state_dict: Any, path: Path, method: str) -> None:
    """Load ``state_dict`` into ``model`` once every tensor name and shape fits (:func:`weights_mismatch`);
    else an :class:`InputError` naming ``path``."""
    if (mismatch := weights_mismatch(model, state_dict)) is not None:
        raise InputError(f"{path}: its weights do not fit the {method} model its hparams build: {mismatch}")
    model.load_state_dict(state_dict)
