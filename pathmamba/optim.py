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

The flags are plain attributes: ``model.to(...)`` and ``load_state_dict`` keep them, but
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


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser groups for ``model``: the decayed parameters with ``weight_decay``, then the exempt ones
    (see the module docstring) with weight decay 0. Every parameter is in one group, frozen ones too (Adam
    skips a parameter without a gradient; a method may unfreeze one later). An empty exempt group is left
    out: a model with nothing exempt keeps the single group, ordered as ``parameters()``, that it had
    before the groups existed. Each group carries its ``name`` ("decay", "no_decay"), kept by torch in
    the optimiser's state dict."""
    exempt_1d = _exempt_1d(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if getattr(p, "_no_weight_decay", False) or id(p) in exempt_1d:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def adam(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """The paper's optimiser (Adam, L2 weight decay) over :func:`parameter_groups`, as one fused kernel.

    Fused on the CPU too: torch's unfused CPU update takes the square root of the second moment from MKL's
    vector math, whose last bit differs between Intel and AMD CPUs even with MKL's reproducibility
    branch pinned; the fused kernel uses the exactly rounded square-root instruction, the same on every
    x86-64 CPU (pathmamba/cpu_pins.py). On CUDA it is one kernel launch instead of one per tensor."""
    return torch.optim.Adam(parameter_groups(model, weight_decay), lr=lr, fused=True)
