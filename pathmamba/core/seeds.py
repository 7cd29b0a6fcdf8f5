"""Seeds and the global random-number generators' states (python, numpy, torch, CUDA)."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed``.

    ``deterministic`` turns on ``torch.use_deterministic_algorithms`` and cuDNN's deterministic mode
    and switches cuDNN's autotuner off, for bitwise-identical GPU runs at some cost in speed. Without
    it the autotuner is on: it picks the fastest convolution kernels, which may differ run to run.
    """
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Switching the mode imports torch._inductor (1.6 s on 2 CPU cores, in every job): only on a change.
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends only on ``parts`` (e.g. run seed, epoch, item), spread by SHA-256 so
    that neighbouring tuples give unrelated streams."""
    digest = hashlib.sha256(",".join(str(int(part)) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch, CUDA) a resumed run needs to continue exactly.

    Tensors and plain Python values only, so a checkpoint holding it loads with ``weights_only=True``:
    numpy's state tuple carries an array, kept here as a list of ints.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = [str(name), [int(key) for key in keys], int(position), int(has_gauss), float(cached_gaussian)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs back to a state saved by :func:`rng_state`."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
