"""Optimiser parameter groups: which parameters the weight decay applies to (docs/design.md §8.1).

Two rules, as in Mamba and VMamba:

- A parameter flagged ``_no_weight_decay = True`` by the module that owns it is never decayed (mamba_ssm's
  convention for ``A_log`` and ``D``; here DC-Mamba's ``A_logs``, ``Ds`` and ``dt_projs_bias``). Decay
  would pull A_log towards 0 (every state's decay rate towards 1), D towards 0 and the dt bias towards
  softplus(0) = 0.69, i.e. away from the time scales the initialisation spreads over [dt_min, dt_max].
- Inside a module that sets ``_no_weight_decay_1d = True`` (PathMamba's CMB encoder, MLP decoder and stage
  classifiers), every 1-D parameter (norm weights and biases, linear and convolution biases) is not
  decayed either: VMamba's optimiser (``set_weight_decay``, from Swin) and timm's
  ``param_groups_weight_decay`` do this for the whole network. Everywhere else (the MIML ResNet, every
  baseline) all unflagged parameters decay as before: the baselines keep the single decayed group that
  their results were produced with.

A module may also set ``_lr_scale`` (a float): its parameters train at that multiple of the learning rate,
in groups of their own (the authors' side-output decoders of the MIML branch at lr / 100, their
``functions/train.py``). The flags are plain attributes: ``model.to(...)`` and ``load_state_dict`` keep them, but
``copy.deepcopy`` of a parameter does not, so build the groups from the model the optimiser steps.
"""

from __future__ import annotations

import torch
from torch import nn


def _exempt_1d(model: nn.Module) -> set[int]:
    """ids of the 1-D parameters inside modules that opt in with ``_no_weight_decay_1d``."""
    return {
        id(p)
        for module in model.modules()
        if getattr(module, "_no_weight_decay_1d", False)
        for p in module.parameters()
        if p.ndim <= 1
    }


def _lr_scales(model: nn.Module) -> dict[int, float]:
    """``{id(parameter): scale}`` for the parameters of modules that set ``_lr_scale``."""
    return {id(p): float(module._lr_scale) for module in model.modules() if hasattr(module, "_lr_scale")
            for p in module.parameters()}


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser groups for ``model``: the decayed parameters with ``weight_decay``, then the exempt ones
    (see the module docstring) with weight decay 0, each split by learning-rate scale (1 first). Every
    parameter is in one group, frozen ones too (Adam skips a parameter without a gradient; a method may
    unfreeze one later). Empty groups are left out: a model with nothing exempt or scaled keeps the
    single group, ordered as ``parameters()``, that it had before the groups existed. Each group carries
    its ``name`` ("decay", "no_decay", "decay_lr_x0.01", ...) and ``lr_scale``, kept by torch in the
    optimiser's state dict."""
    exempt_1d, scales = _exempt_1d(model), _lr_scales(model)
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        exempt = getattr(p, "_no_weight_decay", False) or id(p) in exempt_1d
        grouped.setdefault((exempt, scales.get(id(p), 1.0)), []).append(p)
    return [{"name": ("no_decay" if exempt else "decay") + ("" if scale == 1.0 else f"_lr_x{scale:g}"),
             "params": params, "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale}
            for (exempt, scale), params in sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1] != 1.0))]


def adam(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """The paper's optimiser (Adam, L2 weight decay) over :func:`parameter_groups`, as one fused kernel.

    Fused on the CPU too: torch's unfused CPU update takes the square root of the second moment from MKL's
    vector math, whose last bit differs between Intel and AMD CPUs even with MKL's reproducibility
    branch pinned; the fused kernel uses the exactly rounded square-root instruction, the same on every
    x86-64 CPU (pathmamba/core/cpu_pins.py). On CUDA it is one kernel launch instead of one per tensor."""
    groups = [{**group, "lr": lr * group["lr_scale"]} for group in parameter_groups(model, weight_decay)]
    return torch.optim.Adam(groups, lr=lr, fused=True)
