"""Benchmark: the CPU selective scan against its exp-bound limit, today's and the previous version side by side.

At the paper model's first stage (batch 2, d_inner 192 x 4 directions = 768 channels, L = 56 * 56 =
3136, d_state 16, grouped B/C, softplus, D and delta_bias, as DC-Mamba calls it), for each thread
count, prints one table row per implementation: forward and forward+backward milliseconds (median
and minimum over ``--repeats`` runs, the implementations interleaved so that other load on the
machine falls on all of them alike), and the forward+backward time over the exp-bound time.

- **chunked (now)**: ``selective_scan_chunked`` of ``pathmamba/models/scan.py``.
- **chunked (before)**: the implementation it replaced, kept below for this comparison only: states
  (B, D, N) with N innermost, the output and the gradients of B and C as einsums, sums over N as
  ``sum(-1)`` over 16 contiguous values.
- **exp-bound**: the exponentials neither can avoid: exp(delta A) over B x D x L x N values, once
  forward and once more in the backward (which recomputes a chunk's states instead of keeping all
  L of them), timed in this process as chunk-sized ``torch.exp`` calls into one reused buffer, the
  cheapest way to compute them.

It also prints the largest difference between the two implementations' outputs and gradients,
relative to the largest value (float32 rounding: about 1e-6).

    python -m benchmarks.scan_cpu                    # 1 and 2 threads, 5 repeats
    python -m benchmarks.scan_cpu --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.scan_and_models import scan_inputs
from pathmamba.models import scan as scan_mod

NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


# --- the previous implementation (pathmamba/models/scan.py before issue 27), for comparison only ------


def _before_chunk_inputs(A, delta_c, u_c, B_c, G):
    T, Bsz, Dch = delta_c.shape
    dA = (delta_c.unsqueeze(-1) * A).exp_()
    dBu = (delta_c * u_c).view(T, Bsz, G, Dch // G, 1) * B_c.unsqueeze(3)
    return dA, dBu.view(T, Bsz, Dch, -1)


class _BeforeChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        L, Bsz, Dch = u.shape
        G, N = B.shape[2], A.shape[1]
        y = u.new_empty(L, Bsz, Dch)
        x = u.new_zeros(Bsz, Dch, N)
        starts = []
        for s in range(0, L, chunk):
            e = min(s + chunk, L)
            starts.append(x)
            dA, xs = _before_chunk_inputs(A, delta[s:e], u[s:e], B[s:e], G)
            scan_mod._scan_states(dA, xs, x)  # unchanged since: in place, xs becomes the states
            xs_g = xs.view(e - s, Bsz, G, Dch // G, N)
            y[s:e] = torch.einsum("tbgdn,tbgn->tbgd", xs_g, C[s:e]).reshape(e - s, Bsz, Dch)
            x = xs[-1].clone()
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        ctx.chunk = chunk
        return y, x

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, starts = ctx.saved_tensors
        chunk = ctx.chunk
        L, Bsz, Dch = u.shape
        G, N = B.shape[2], A.shape[1]
        Dg = Dch // G
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA_param = torch.zeros_like(A)
        carry = dlast.contiguous() if dlast is not None else u.new_zeros(Bsz, Dch, N)
        dy = dy.contiguous()
        for i in reversed(range(len(starts))):
            s = i * chunk
            e = min(s + chunk, L)
            T = e - s
            x0 = starts[i]
            d_c, u_c, B_c, C_c, dy_c = delta[s:e], u[s:e], B[s:e], C[s:e], dy[s:e]
            dA, xs = _before_chunk_inputs(A, d_c, u_c, B_c, G)
            scan_mod._scan_states(dA, xs, x0)
            xs_g = xs.view(T, Bsz, G, Dg, N)
            dC[s:e] = torch.einsum("tbgd,tbgdn->tbgn", dy_c.view(T, Bsz, G, Dg), xs_g)
            g = (dy_c.view(T, Bsz, G, Dg, 1) * C_c.unsqueeze(3)).view(T, Bsz, Dch, N)
            g[-1].add_(carry)
            for t in range(T - 2, -1, -1):
                g[t].addcmul_(dA[t + 1], g[t + 1])
            g_g = g.view(T, Bsz, G, Dg, N)
            gB = torch.einsum("tbgdn,tbgn->tbgd", g_g, B_c).reshape(T, Bsz, Dch)
            du[s:e] = gB * d_c
            ddelta[s:e] = gB * u_c
            dB[s:e] = torch.einsum("tbgdn,tbgd->tbgn", g_g, (d_c * u_c).view(T, Bsz, G, Dg))
            h = g.mul_(dA)
            carry = h[0].clone()
            h[1:].mul_(xs[:-1])
            h[0].mul_(x0)
            ddelta[s:e] += (h * A).sum(-1)
            dA_param += (h * d_c.unsqueeze(-1)).sum((0, 1))
        return du, ddelta, dA_param, dB, dC, None


def _before_core(u, delta, A, B, C):
    Bsz, Dch, L = u.shape
    chunk = scan_mod._chunk_len(Bsz, Dch, A.shape[1], L, u.element_size(), None)
    y, last = _BeforeChunkedScan.apply(
        u.permute(2, 0, 1).contiguous(),
        delta.permute(2, 0, 1).contiguous(),
        A.contiguous(),
        B.permute(3, 0, 1, 2).contiguous(),
        C.permute(3, 0, 1, 2).contiguous(),
        chunk,
    )
    return y.permute(1, 2, 0), last


def selective_scan_before(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    return scan_mod._selective_scan(
        _before_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


# --- measuring -----------------------------------------------------------------------------------------

IMPLEMENTATIONS = {"chunked (before)": selective_scan_before, "chunked (now)": scan_mod.selective_scan_chunked}


def run_scan(fn, ts: dict, weight: torch.Tensor | None) -> list[torch.Tensor]:
    """y and, with a ``weight`` of y's shape, the gradients of every input for the loss (y * weight).sum()."""
    with torch.set_grad_enabled(weight is not None):
        y = fn(*(ts[k] for k in NAMES[:5]), D=ts["D"], delta_bias=ts["delta_bias"], delta_softplus=True)
    if weight is None:
        return [y]
    return [y.detach(), *torch.autograd.grad((y * weight).sum(), [ts[k] for k in NAMES])]


def exp_bound(ts: dict, passes: int) -> None:
    """``passes`` x B x D x L x N exponentials of exp(delta A), in the scan's chunk-sized calls."""
    Bsz, Dch, L = ts["u"].shape
    N = ts["A"].shape[1]
    chunk = scan_mod._chunk_len(Bsz, Dch, N, L, 4, None)
    delta = torch.nn.functional.softplus(ts["delta"][:, :, :chunk].detach() + ts["delta_bias"].detach()[:, None])
    exponents = (delta.permute(2, 0, 1).unsqueeze(-1) * ts["A"].detach()).contiguous()  # one chunk's values
    buffer = torch.empty_like(exponents)
    for _ in range(passes):
        for s in range(0, L, chunk):
            torch.exp(exponents[: min(chunk, L - s)], out=buffer[: min(chunk, L - s)])


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b, strict=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=3136)
    p.add_argument("--d-inner", type=int, default=192, help="per direction; the scan sees 4 x this")
    p.add_argument("--d-state", type=int, default=16)
    args = p.parse_args(argv)
    ts = scan_inputs(args.batch, args.length, args.d_inner, args.d_state, torch.device("cpu"), grad=True)
    Bsz, Dch, L = ts["u"].shape
    print(f"torch {torch.__version__}; u ({Bsz}, {Dch}, {L}), d_state {args.d_state}, 4 groups; "
          f"{Bsz * Dch * L * args.d_state / 1e6:.0f} M exponentials per pass; "
          f"load average {os.getloadavg()[0]:.1f}\n", flush=True)

    weight = torch.randn(ts["u"].shape, generator=torch.Generator().manual_seed(1))  # fixed: every y matters
    outputs = {name: run_scan(fn, ts, weight) for name, fn in IMPLEMENTATIONS.items()}
    difference = max_relative_difference(outputs["chunked (now)"], outputs["chunked (before)"])
    print(f"largest difference now vs before, y and every gradient, relative to the largest value: "
          f"{difference:.1e}\n", flush=True)

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        tasks = {("exp-bound", False): lambda: exp_bound(ts, 1), ("exp-bound", True): lambda: exp_bound(ts, 2)}
        for name, fn in IMPLEMENTATIONS.items():
            for backward in (False, True):
                tasks[name, backward] = lambda fn=fn, w=weight if backward else None: run_scan(fn, ts, w)
        for task in tasks.values():  # warm-up: allocator pools, lazy initialisation
            task()
        times = {key: [] for key in tasks}
        for _ in range(args.repeats):
            for key, task in tasks.items():
                times[key].append(seconds(task))
        median = {key: statistics.median(runs) for key, runs in times.items()}
        for name in ("exp-bound", *IMPLEMENTATIONS):
            fwd, fb = times[name, False], times[name, True]
            rows.append(
                f"| {threads} | {name} | {statistics.median(fwd) * 1e3:.0f} ({min(fwd) * 1e3:.0f}) | "
                f"{statistics.median(fb) * 1e3:.0f} ({min(fb) * 1e3:.0f}) | "
                f"{median[name, True] / median['exp-bound', True]:.1f} |"
            )
            print(rows[-1], flush=True)
    print(
        "\n\n| threads | implementation | fwd ms, median (min) | fwd+bwd ms, median (min) | "
        "fwd+bwd / exp-bound |\n|---|---|---|---|---|\n" + "\n".join(rows)
        + f"\n\nload average at the end: {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
