"""Benchmark: selective scan implementations, PathMamba's variants against a U-Net, demo training steps.

Prints three markdown tables:

(a) the scan implementations side by side (``selective_scan_chunked``, the fallback;
    ``selective_scan_parallel``; ``selective_scan_ref``; mamba_ssm's fused kernel on CUDA when
    importable) at PathMamba's sizes, with the four directions folded into channels as DC-Mamba calls
    them (u of (batch, 4 d_inner, L), grouped B/C, softplus, D, delta_bias): time and peak memory of
    forward and forward+backward. Combinations that would take minutes (the reference's backward is
    quadratic in L) or exceed the memory limit (the parallel scan keeps every state) are skipped and
    marked with the reason.
(b) parameters, FLOPs and forward / forward+backward time per image of every PathMamba variant at
    paper size against segmentation-models-pytorch's Unet(resnet50).
(c) one demo training step (forward + backward + Adam) per variant at the tiny demo setting.

    python -m benchmarks.scan_and_models            # everything (CPU: about 5 minutes on 2 cores)
    python -m benchmarks.scan_and_models --quick    # smaller grid, fewer runs

Memory on CPU is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after returning freed heap to the system), so it includes allocator slack; on
CUDA it is ``torch.cuda.max_memory_allocated`` above the allocation before the call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pathmamba.engine.registry import build_method
from pathmamba.models import scan as scan_mod
from pathmamba.models.cmb import DCMamba

VARIANTS = [
    "pathmamba-b",
    "pathmamba-b-miml",
    "pathmamba-b-cmb",
    "pathmamba-b-miml-cmb",
    "pathmamba",
    "pathmamba-noscan",
]
# The demo setting recommended for config/demo.yaml: every component kept, widths cut to fit 2 CPU cores.
TINY = {
    "dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "d_state": 8, "ssm_ratio": 1.0, "decoder_dim": 32,
    "backbone": "resnet18",
}


# --- measuring ---------------------------------------------------------------------------------------


class Meter:
    """Peak memory above the starting point, in MiB, for CPU (resident set) or CUDA (allocator)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None

    def _rss_kib(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._libc.malloc_trim(0)  # freed heap would otherwise hide new allocations
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._base = self._rss_kib("VmRSS:")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated() - self._base) / 2**20
        return (self._rss_kib("VmHWM:") - self._base) / 1024


def timed(fn, device: torch.device, meter: Meter, min_time: float, max_runs: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of ``fn``.

    The first run warms up (lazy initialisation, allocator pools); a first run that already took
    ``min_time`` is taken as is, memory included, since warm-up is negligible beside it. Otherwise runs
    repeat while their total stays under ``min_time`` (at most ``max_runs``), and memory is their peak.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    meter.start()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    if first >= min_time or max_runs <= 1:
        return first, meter.peak_mib()
    meter.start()
    runs = []
    while len(runs) < max_runs and sum(runs) < min_time:
        t = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), meter.peak_mib()


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


# --- (a) scans -----------------------------------------------------------------------------------------


def scan_inputs(batch: int, L: int, d_inner: int, d_state: int, device, grad: bool):
    K, D = 4, 4 * d_inner
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)
    ts = {
        "u": rnd(batch, D, L),
        "delta": rnd(batch, D, L) * 0.5 - 4.0,  # softplus -> dt around 0.02, as after Mamba's init
        "A": -torch.exp(rnd(D, d_state) * 0.5),
        "B": rnd(batch, K, d_state, L),
        "C": rnd(batch, K, d_state, L),
        "D": torch.ones(D),
        "delta_bias": rnd(D) * 0.1,
    }
    return {k: v.to(device).requires_grad_(grad) for k, v in ts.items()}


def scan_impls(device: torch.device) -> dict:
    impls = {
        "fallback (chunked)": scan_mod.selective_scan_chunked,
        "parallel (log-depth)": scan_mod.selective_scan_parallel,
        "reference (per step)": scan_mod.selective_scan_ref,
    }
    if device.type == "cuda" and scan_mod.FUSED_SELECTIVE_SCAN is not None:
        impls["mamba_ssm (fused CUDA)"] = scan_mod.FUSED_SELECTIVE_SCAN
    return impls


def skip_reason(impl: str, batch: int, L: int, d_inner: int, d_state: int, args) -> str | None:
    elements = batch * 4 * d_inner * L * d_state
    if impl.startswith("reference") and batch * L > args.ref_max_steps:
        # its backward is quadratic in L (each step's slice gradient is a full-size tensor)
        return "skipped: minutes (quadratic backward)"
    if impl.startswith("parallel") and 12 * elements * 4 > args.max_mem_gib * 2**30:
        # keeps about a dozen (batch, D, L, N) float32 tensors alive for backward
        return f"skipped: > {args.max_mem_gib:g} GiB"
    return None


def bench_scans(args, device, meter) -> list[str]:
    impls = scan_impls(device)
    rows = []
    for batch, L, d_inner in itertools.product(args.batches, args.lengths, args.d_inners):
        for name, fn in impls.items():
            reason = skip_reason(name, batch, L, d_inner, args.d_state, args)
            if reason:
                rows.append(f"| {batch} | {L} | {d_inner} | {name} | {reason} | | | |")
                continue
            cells = []
            for backward in (False, True):
                ts = scan_inputs(batch, L, d_inner, args.d_state, device, grad=backward)

                def step(fn=fn, ts=ts, backward=backward):
                    with torch.set_grad_enabled(backward):
                        y = fn(
                            ts["u"],
                            ts["delta"],
                            ts["A"],
                            ts["B"],
                            ts["C"],
                            D=ts["D"],
                            delta_bias=ts["delta_bias"],
                            delta_softplus=True,
                        )
                    if backward:
                        y.sum().backward()

                sec, mib = timed(step, device, meter, args.min_time, args.max_runs)
                cells += [fmt_ms(sec), f"{mib:.0f}"]
            rows.append(f"| {batch} | {L} | {d_inner} | {name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    head = [
        f"### (a) Selective scan, d_state {args.d_state}, 4 directions folded into channels ({device})",
        "",
        "| batch | L | d_inner | implementation | fwd ms | fwd MiB | fwd+bwd ms | fwd+bwd MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


# --- (b) models at paper size -----------------------------------------------------------------------


def scan_flops(model: torch.nn.Module, images: torch.Tensor) -> float:
    """FLOPs of the scans' elementwise recurrence, which FlopCounterMode does not see (it counts
    matmuls and convolutions): 9 per (batch, channel, step, state), Mamba's count for the forward."""
    total = 0.0

    def hook(module, inputs, _):
        b, h, w, _ = inputs[0].shape
        nonlocal total
        total += 9.0 * b * module.K * module.d_inner * h * w * module.d_state

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, DCMamba) and m.mixer == "selective-scan"
    ]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return total


def bench_models(args, device, meter) -> list[str]:
    import segmentation_models_pytorch as smp

    n, size = args.model_batch, args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    targets = (torch.rand(n, 4, generator=g) > 0.5).float().to(device)
    masks = torch.randint(0, 4, (n, size, size), generator=g).to(device)
    rows = []
    entries = [(v, None) for v in args.variants] + [("unet (smp, resnet50)", "unet")]
    for name, kind in entries:
        torch.manual_seed(0)
        if kind == "unet":
            model = smp.Unet("resnet50", encoder_weights=None, classes=4).to(device)
            loss_fn = lambda model=model: torch.nn.functional.cross_entropy(model(images), masks)
        else:
            model = build_method(name, num_classes=4).to(device)
            loss_fn = lambda model=model: model.loss(images, targets)[0]
        params = sum(p.numel() for p in model.parameters())
        model.eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images[:1])
        gflops = counter.get_total_flops() / 1e9
        extra = scan_flops(model, images[:1]) / 1e9 if kind is None else 0.0
        fwd, fwd_mib = timed(
            lambda model=model: torch.no_grad()(model)(images), device, meter, args.min_time, args.max_runs
        )
        model.train()
        fb, fb_mib = timed(lambda loss_fn=loss_fn: loss_fn().backward(), device, meter, args.min_time, args.max_runs)
        rows.append(
            f"| {name} | {params / 1e6:.2f} | {gflops:.2f} | {extra:.2f} | {fmt_ms(fwd / n)} | "
            f"{fmt_ms(fb / n)} | {fwd_mib:.0f} | {fb_mib:.0f} |"
        )
        print(rows[-1], flush=True)
    head = [
        f"### (b) Models at {size} px, default (paper) hyper-parameters, batch {n} ({device})",
        "",
        ("| model | params (M) | GFLOPs fwd / image (counted) | + scan recurrence GFLOPs | fwd ms / image | "
        "fwd+bwd ms / image | fwd MiB | fwd+bwd MiB |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    return head + rows


# --- (c) demo training step ---------------------------------------------------------------------------


def bench_tiny(args, device, meter) -> list[str]:
    n, size = args.tiny_batch, args.tiny_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    targets = (torch.rand(n, 4, generator=g) > 0.5).float().to(device)
    rows = []
    for name in args.variants:
        torch.manual_seed(0)
        model = build_method(name, num_classes=4, **args.tiny_hparams).to(device).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5, weight_decay=5e-4)

        def step(model=model, opt=opt):
            loss, _ = model.loss(images, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()  # first step allocates Adam's state
        sec, mib = timed(step, device, meter, max(args.min_time, 2.0), max(args.max_runs, 5))
        params = sum(p.numel() for p in model.parameters())
        rows.append(f"| {name} | {params / 1e6:.3f} | {fmt_ms(sec)} | {mib:.0f} |")
        print(rows[-1], flush=True)
    head = [
        f"### (c) Demo training step: batch {n}, {size} px, fwd+bwd+Adam ({device})",
        "",
        f"hyper-parameters: `{json.dumps(args.tiny_hparams)}`",
        "",
        "| variant | params (M) | ms / step | MiB |",
        "|---|---|---|---|",
    ]
    return head + rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="small grid (L 196/784, d_inner 192, batch 2), models at batch 1, fewer runs",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--parts", default="scan,models,tiny", help="comma list of: scan, models, tiny")
    p.add_argument("--lengths", type=int, nargs="+", default=[196, 784, 3136])
    p.add_argument("--d-inners", type=int, nargs="+", default=[192, 384])
    p.add_argument("--batches", type=int, nargs="+", default=[2, 16])
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument(
        "--ref-max-steps",
        type=int,
        default=400,
        help="run the per-step reference only where batch * L is at most this",
    )
    p.add_argument(
        "--max-mem-gib", type=float, default=6.0, help="skip the parallel scan above this estimate"
    )
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--size", type=int, default=224, help="image size for (b)")
    p.add_argument("--model-batch", type=int, default=2, help="batch for (b); times are per image")
    p.add_argument("--tiny-batch", type=int, default=16)
    p.add_argument("--tiny-size", type=int, default=64)
    p.add_argument("--tiny-hparams", type=json.loads, default=TINY, help="JSON dict for (c)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of repeated runs per measurement")
    p.add_argument("--max-runs", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.d_inners, args.batches = [196, 784], [192], [2]
        args.model_batch, args.max_runs, args.min_time = 1, 2, 0.3
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meter = Meter(device)
    parts = set(args.parts.split(","))
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} CPU threads, "
        f"mamba_ssm fused kernel: {'yes' if scan_mod.FUSED_SELECTIVE_SCAN else 'no'}\n",
        flush=True,
    )
    tables = []
    for part, fn in [("scan", bench_scans), ("models", bench_models), ("tiny", bench_tiny)]:
        if part in parts:
            tables.append("\n".join(fn(args, device, meter)))
    print("\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
