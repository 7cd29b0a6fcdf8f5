"""FLOPs and bytes per image, counted from the built models: the physical floor of the GPU jobs.

``python -m pathmamba plan --floor`` sets each method's estimate beside the least time a named GPU
needs for the work it does (pathmamba/operations/plan.py does the arithmetic; docs/gpu-hours.md the model). This
module does the counting, once per method and settings, into the config's ``floor.costs_file``:

- a training step (``model.loss``, then ``backward``) and an evaluation batch (``model.predict``, no
  gradient); a first stage also its pseudo-mask pass (``model.pseudo_masks``);
- on the CPU, on :data:`BATCH` random uint8 images normalised as the loaders' batches are, at the
  config's hyper-parameters (every weights file ``none``: the values do not change the work) and image
  size, with random targets shaped like the method's supervision;
- FLOPs: the per-operator formulas of :class:`torch.utils.flop_counter.FlopCounterMode` (its
  ``flop_registry``: matrix products, convolutions and attention, 2 per multiply-add), applied by
  :class:`OpCounter` (FlopCounterMode itself tracks modules with autograd hooks that Grad-CAM's own
  ``autograd.grad`` calls inside ``predict`` do not allow);
- bytes: :class:`OpCounter`, the elements every operator reads and writes (views move nothing),
  at :data:`BYTES_PER_ELEMENT` bytes (bf16, the paper config's precision): each operator taking its
  inputs from and writing its outputs to GPU memory, as eager PyTorch runs them, unfused;
- the selective scan apart: neither counter sees what mamba_ssm's fused kernel does (its exponentials
  and multiply-adds run on the CUDA cores, its state stays in registers), so while counting each scan
  call is replaced by :class:`_ScanStandIn` (an output of the scan's shape that depends on every input,
  so that the backward reaches the projections feeding it; not counted, nor its backward) and the
  kernel's work is counted from the call's shapes (:func:`scan_work`).

Nothing here runs on a GPU: the counts are the same on any machine. Values are per image (the batch's
counts divided by :data:`BATCH`).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import flop_registry

from pathmamba.core.files import atomic_write_json
from pathmamba.core.settings import TrainSettings
from pathmamba.data.datasets import normalised_batch
from pathmamba.data.specs import DatasetSpec
from pathmamba.engine.config import (
    ConfigError,
    configured_dataset_spec,
    grid_methods,
    method_hparams,
    train_settings,
    without_weights_files,
)
from pathmamba.engine.registry import EpochAware, build_method, get_spec, training_stages
from pathmamba.models import cmb
from pathmamba.operations.plan import (
    costs_path,
    dataset_image_size,
    largest_image_dataset,
    load_costs,
    method_costs,
)

log = logging.getLogger("pathmamba.operations.costs")

#: Images per counted batch: two, so that batch statistics (BatchNorm in training) are defined.
BATCH = 2
#: Bytes of one activation element on the GPU: bf16, the paper config's ``precision``. Norms, losses and
#: the optimiser keep float32 there; counting them at 2 bytes keeps the traffic a floor.
BYTES_PER_ELEMENT = 2
#: Mask kinds of a second stage's pseudo masks when counting it alone (WSSS-Tissue's three layers).
PSEUDO_MASK_KINDS = 3


class OpCounter(TorchDispatchMode):
    """FLOPs (``flops``, FlopCounterMode's formulas) and elements read and written (``elements``: the sum
    of the tensor arguments' and results' sizes) of every operator dispatched while active. A view (a
    result aliasing an input without writing it) moves nothing; an in-place operator reads and writes
    its target."""

    def __init__(self):
        super().__init__()
        self.flops = 0
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func._overloadpacket is torch.ops.aten.convolution_backward:
            self.flops += convolution_backward_flops(*args)
        elif func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=result)
        returns = func._schema.returns
        if not any(ret.alias_info is not None and not ret.alias_info.is_write for ret in returns):
            tensors = [t for t in tree_flatten((args, kwargs or {}, result))[0] if isinstance(t, torch.Tensor)]
            self.elements += sum(t.numel() for t in tensors)
        return result


def convolution_backward_flops(grad_output, x, weight, _bias_sizes, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask) -> int:
    """FLOPs of ``aten.convolution_backward``: the gradient of the input and that of the weight each take
    the forward's multiply-adds (one per output element and weight element of its group). FlopCounterMode's
    own formula leaves the groups out of the weight's gradient, counting a depthwise convolution's
    ``channels`` times over (PyTorch 2.14)."""
    per_element = math.prod(weight.shape[1:])  # input channels of a group (output channels: transposed) x kernel
    forward = 2 * (x.numel() if transposed else grad_output.numel()) * per_element
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def scan_work(batch: int, channels: int, length: int, groups: int, d_state: int, backward: bool) -> dict[str, int]:
    """What mamba_ssm's fused selective scan does for one call on u, delta (batch, channels, length) and
    B, C (batch, groups, d_state, length): its exponentials, its other floating-point operations and the
    bytes it moves to and from GPU memory (bf16 tensors; the state never leaves the chip).

    Forward, per (batch, channel, step, state): one exp (exp(delta A)) and 6 FLOPs (delta A; the state's
    multiply-add; delta u B; C x's multiply-add). It reads u, delta, B, C and writes y. The backward
    kernel recomputes the forward states (the same exps and FLOPs) and then runs the reverse recurrence
    (8 FLOPs: the gradient state's multiply-add, and one multiply-add each for dC, dB, d(delta A)); it
    reads u, delta, B, C and dy and writes du, d delta, dB and dC.
    """
    states = batch * channels * length * d_state
    per_channel = batch * channels * length  # elements of u, delta, y
    per_state = batch * groups * d_state * length  # elements of B, C
    if not backward:
        return {"exps": states, "flops": 6 * states,
                "bytes": BYTES_PER_ELEMENT * (3 * per_channel + 2 * per_state)}
    return {"exps": 2 * states, "flops": (6 + 8) * states,
            "bytes": BYTES_PER_ELEMENT * (5 * per_channel + 4 * per_state)}


class _ScanStandIn(torch.autograd.Function):
    """Zeros of u's shape in place of the scan, with zero gradients for u, delta, B and C, computed with
    the counters off: the work around the scan is counted as the model does it, the scan's own apart."""

    @staticmethod
    def forward(ctx, u, delta, B, C):
        ctx.inputs = [(t.shape, t.dtype) for t in (u, delta, B, C)]
        with _disable_current_modes():
            return torch.zeros_like(u)

    @staticmethod
    def backward(ctx, dy):
        with _disable_current_modes():
            return tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in ctx.inputs)


@contextmanager
def scan_counted_apart(work: dict[str, int], backward: bool):
    """While active, every selective scan of the PathMamba blocks (pathmamba.models.cmb) is the stand-in,
    and the fused kernel's work for it (:func:`scan_work`, with its backward when ``backward``) is added
    to ``work``. The blocks call the scan through their module's name, which this swaps and restores."""
    real = cmb.selective_scan

    def counted(u, delta, A, B, C, *args, **kwargs):
        batch, channels, length = u.shape
        groups = B.shape[1] if B.dim() == 4 else 1
        for key, value in scan_work(batch, channels, length, groups, A.shape[-1], backward).items():
            work[key] = work.get(key, 0) + value
        return _ScanStandIn.apply(u, delta, B.view(batch, groups, -1, length), C.view(batch, groups, -1, length))

    cmb.selective_scan = counted
    try:
        yield
    finally:
        cmb.selective_scan = real


def random_targets(supervision: str, n: int, image_size: int, pseudo_mask_kinds: int,
                   num_classes: int) -> torch.Tensor:
    """Training targets as the engine's datasets batch them: multi-hot labels (image), a mask with
    ignored pixels (pixel; the index ``num_classes``), or one such mask per pseudo-mask kind (pseudo)."""
    if supervision == "image":
        return torch.randint(0, 2, (n, num_classes)).float()
    side = (image_size, image_size)
    shape = (n, *side) if supervision == "pixel" else (n, pseudo_mask_kinds, *side)
    return torch.randint(0, num_classes + 1, shape)


def count(run, backward: bool) -> dict[str, float]:
    """FLOPs, bytes and the scan's work (exps, FLOPs, bytes) per image of ``run()`` on a batch of
    :data:`BATCH` images."""
    scan: dict[str, int] = {}
    counter = OpCounter()
    with scan_counted_apart(scan, backward), counter:
        run()
    return {"flops": counter.flops / BATCH, "bytes": counter.elements * BYTES_PER_ELEMENT / BATCH,
            **{f"scan_{key}": scan.get(key, 0) / BATCH for key in ("exps", "flops", "bytes")}}


def count_method(method: str, hparams: dict[str, Any], image_size: int, dataset: DatasetSpec, stage: int | None = None,
                 stage1_hparams: dict[str, Any] | None = None, epochs: int = 1) -> dict[str, Any]:
    """The per-image work of ``method`` (``stage=1``: its first stage) built with ``hparams`` (weights
    files set to ``none``) at ``image_size`` px: ``train`` (a training step without the optimiser,
    whose traffic the plan adds from ``parameters``), ``eval`` and, for a first stage, ``pseudo_masks``.
    ``dataset``: the dataset's spec, for its classes and the models' per-dataset choices. A method with
    per-epoch state (SC-CAM's clusters, WSSS-Tissue's attention) is counted in the state of its last
    epoch, ``epochs``, what most of its steps run (its per-epoch passes themselves are not counted)."""
    started = time.perf_counter()
    torch.manual_seed(0)
    supervision = get_spec(method, stage).supervision
    build = {**without_weights_files(hparams),
             **({"stage1_hparams": without_weights_files(stage1_hparams)} if stage1_hparams is not None else {})}
    classes = dataset.num_classes
    model = build_method(method, num_classes=classes, stage=stage, **build)
    uint8 = torch.randint(0, 256, (BATCH, 3, image_size, image_size), dtype=torch.uint8)
    images = normalised_batch(uint8, torch.device("cpu"))
    targets = random_targets(supervision, BATCH, image_size, PSEUDO_MASK_KINDS, classes)
    if isinstance(model, EpochAware):
        loader = DataLoader(TensorDataset(uint8, targets), batch_size=BATCH)
        for epoch in range(1, epochs + 1):
            model.on_epoch_start(epoch, loader, torch.device("cpu"), dataset.name)

    def train_step():
        loss, _ = model.loss(images, targets)
        loss.backward()

    model.train()
    entry = {"parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "train": count(train_step, backward=True)}
    model.eval()
    with torch.no_grad():
        entry["eval"] = count(lambda: model.predict(images), backward=False)
    if stage == 1:
        labels = torch.randint(0, 2, (BATCH, classes)).float()
        entry["pseudo_masks"] = count(lambda: model.pseudo_masks(images, labels, dataset), backward=False)
    log.info("%s%s counted in %.1f s: %.3g GFLOPs and %.3g GB per image per training step", method,
             " (stage 1)" if stage == 1 else "", time.perf_counter() - started, entry["train"]["flops"] / 1e9,
             entry["train"]["bytes"] / 1e9)
    return {**entry, "hparams": without_weights_files(hparams), "image_size": image_size}


def count_config(config: dict[str, Any], methods: list[str], image_size: int, dataset: str) -> dict[str, Any]:
    """:func:`count_method` for each of ``methods`` of ``config`` on its ``dataset`` (a two-stage method:
    its first stage under ``stage1``)."""
    spec = configured_dataset_spec(config, dataset)
    counted = {}
    for method in methods:
        hparams = method_hparams(config, method)
        epochs = train_settings(config, method).get("epochs", TrainSettings.epochs)
        if get_spec(method).stage1 is not None:
            first = method_hparams(config, method, stage=1)
            first_epochs = train_settings(config, method, stage=1).get("epochs", TrainSettings.epochs)
            counted[method] = {**count_method(method, hparams, image_size, spec, stage1_hparams=first,
                                              epochs=epochs),
                               "stage1": count_method(method, first, image_size, spec, stage=1,
                                                      epochs=first_epochs)}
        else:
            counted[method] = count_method(method, hparams, image_size, spec, epochs=epochs)
    return counted


def costs_record(methods: dict[str, Any]) -> dict[str, Any]:
    """The costs file's content: the counts with what counted them."""
    return {"counted_by": "python -m pathmamba plan --floor", "torch": torch.__version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "batch": BATCH,
            "bytes_per_element": BYTES_PER_ELEMENT, "methods": methods}


def uncounted_methods(config: dict[str, Any]) -> list[str]:
    """Methods of the grid whose work (or their first stage's) the costs file lacks at the grid's largest
    image size and their hyper-parameters."""
    dataset = largest_image_dataset(config)
    return [method for method in grid_methods(config)
            if any(method_costs(config, dataset, method, stage) is None
                   for stage in training_stages(method))]


def update_costs(config: dict[str, Any]) -> list[str]:
    """Count the methods :func:`uncounted_methods` names and write them into ``floor.costs_file``
    (:func:`pathmamba.operations.plan.costs_path`) beside the counts it holds, atomically after each method; a file
    there that is not a costs file is refused (:func:`pathmamba.operations.plan.load_costs`) before any counting.
    Returns the methods counted."""
    if "floor" not in config:
        raise ConfigError("floor: not configured; counting needs a floor block (GPU peaks, efficiencies, costs "
                          "file), as in config/config.yaml")
    counted = (load_costs(config) or {}).get("methods", {})
    methods = uncounted_methods(config)
    dataset = largest_image_dataset(config)
    for method in methods:  # written after each, so that an interrupted count keeps what it counted
        counted = {**counted, **count_config(config, [method], dataset_image_size(config, dataset), dataset)}
        atomic_write_json(costs_path(config), costs_record(counted))
    return methods
