"""The selective scan (S6) of Mamba and VMamba's four-direction cross-scan.

``selective_scan`` has the signature and semantics of ``mamba_ssm``'s ``selective_scan_fn``::

    delta = softplus(delta + delta_bias)            (bias and softplus optional)
    x_t   = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t        x_0 = 0, state (D, N)
    y_t   = C_t . x_t  (+ D * u_t)  (* silu(z_t))

Shapes: u, delta, z (B, D, L); A (D, N); B, C (B, N, L) or grouped (B, G, N, L), channel d using group
``d // (D // G)``; D, delta_bias (D,). Returns y (B, D, L) in u's dtype and, with
``return_last_state``, x_L (B, D, N) in float32 (float64 for float64 inputs).

Which implementation runs on CUDA tensors is a setting (``SCAN_IMPLEMENTATIONS``, chosen with
``select_scan``): ``fused`` is mamba_ssm's CUDA kernel, ``pytorch`` is ``selective_scan_chunked``, and
``auto`` picks the kernel when it is importable and says so when it is not. CPU tensors always run
``selective_scan_chunked``: a sequential loop over L, in chunks of steps, whose hand-written backward
recomputes the states of one chunk at a time, so memory is O(chunk) rather than O(L) in the state
dimension. On 2 CPU cores this beat a log-depth parallel scan by 3-10x and a per-step autograd loop
(mamba_ssm's ``selective_scan_ref``) by about 40x (docs/scan.md).
``selective_scan_parallel`` (log-depth, work-efficient odd/even scan) and ``selective_scan_ref`` (the
per-step loop, exact in float64) are the alternatives the tests and ``benchmarks/`` compare against.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pathmamba.core.settings import SCAN_IMPLEMENTATIONS

log = logging.getLogger(__name__)


def _load_fused():
    """(mamba_ssm's fused ``selective_scan_fn``, None), or (None, why it cannot be imported).

    ``import mamba_ssm`` raises without the compiled ``selective_scan_cuda`` extension (it imports it
    unguarded), so probe the extension and its entry point first; any failure means unavailable.
    """
    try:
        import selective_scan_cuda

        selective_scan_cuda.fwd  # noqa: B018 - a half-built extension lacks its kernels
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # noqa: BLE001 - a broken optional build fails in many ways; report it
        return None, f"{type(error).__name__}: {error}"
    return selective_scan_fn, None


FUSED_SELECTIVE_SCAN, _FUSED_UNAVAILABLE_REASON = _load_fused()
# What selective_scan runs on CUDA tensors: set by select_scan; None until then, when the first CUDA
# call selects "auto".
_selected: str | None = None


def fused_scan_unavailable_reason() -> str | None:
    """Why mamba_ssm's fused kernel cannot be imported here, or None when it can."""
    return _FUSED_UNAVAILABLE_REASON


def select_scan(name: str, device) -> str:
    """Set the implementation ``selective_scan`` runs on CUDA tensors; returns "fused" or "pytorch".

    ``fused`` requires a CUDA ``device`` and the kernel; ``auto`` takes the kernel on CUDA when it is
    importable, else the PyTorch scan, with a warning on a CUDA device (the run is much slower there).
    """
    if name not in SCAN_IMPLEMENTATIONS:
        raise ValueError(f"scan {name!r} is not one of {', '.join(SCAN_IMPLEMENTATIONS)}")
    on_cuda = torch.device(device).type == "cuda"
    reason = fused_scan_unavailable_reason()
    if name == "fused":
        if not on_cuda:
            raise RuntimeError(
                f"scan 'fused' on device {str(device)!r}: mamba_ssm's selective-scan kernel runs on CUDA "
                "only; set `scan: pytorch` (or `auto`) for this device"
            )
        if reason is not None:
            raise RuntimeError(
                f"scan 'fused': mamba_ssm's selective-scan kernel cannot be imported ({reason}). Build it "
                "on this CUDA machine with `make kernels` (docs/environment.md), or set `scan: pytorch`"
            )
    if name == "auto":
        name = "fused" if on_cuda and reason is None else "pytorch"
        if on_cuda and reason is not None:
            log.warning(
                "scan 'auto' on CUDA runs the PyTorch selective scan, a loop of small kernels over the "
                "sequence, many times slower than mamba_ssm's fused kernel, which cannot be imported: %s. "
                "Build it with `make kernels` (docs/environment.md), or set `scan: pytorch` to choose this knowingly",
                reason,
            )
    global _selected
    _selected = name
    return name


def selected_scan() -> str:
    """What ``selective_scan`` runs on CUDA tensors: "fused" or "pytorch" (``auto`` until selected)."""
    if _selected is None:
        return select_scan("auto", "cuda")
    return _selected


# Bytes of one (T, B, G, N, D // G) chunk buffer; forward holds two of them, backward three. Measured
# on 2 cores (training step of the demo model, and scans at L = 196-3136): 1-4 MiB are within noise of
# each other, 16 MiB up to 25% slower (the working set leaves the cache), and much smaller chunks pay
# Python overhead per chunk; again with today's layout (the paper's first-stage scan, one thread):
# 0.5-4 MiB within 15% of each other, 8 MiB 25% slower.
CHUNK_BYTES = 4 * 2**20


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    # Half-precision states drift over long sequences: scan in float32 at least, like the fused kernel.
    return torch.promote_types(u.dtype, torch.float32)


def _grouped(BC: torch.Tensor) -> torch.Tensor:
    """(B, N, L) -> (B, 1, N, L); grouped (B, G, N, L) unchanged."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _selective_scan(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Shared pre- and post-processing around a core ``(u, delta, A, B, C) -> (y, last_state)``.

    The bias, softplus, skip (D) and gate (z) are elementwise over (B, D, L), not over the state
    dimension N, so plain autograd handles them cheaply; only the core needs care for memory.
    """
    dtype_in = u.dtype
    dtype = _compute_dtype(u)
    # Under autocast, einsum and matmul inside the core would drop to half precision again.
    with torch.autocast(u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(dtype)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        y, last_state = core(u, delta, A, _grouped(B), _grouped(C))
        if D is not None:
            y = y + u * D.to(dtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(dtype))
    y = y.to(dtype_in)
    return (y, last_state) if return_last_state else y


# --- the fallback: chunked sequential scan with a hand-written backward ------------------------------


def _chunk_len(Bsz: int, Dch: int, N: int, L: int, itemsize: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        chunk_size = CHUNK_BYTES // (Bsz * Dch * N * itemsize)
    return max(1, min(L, chunk_size))


def _chunk_inputs(A, delta_c, u_c, B_c, dA, xs):
    """Fill dA = exp(delta A) and xs = delta u B for one chunk: (T, B, G, N, Dg) buffers.

    delta_c, u_c are (T, B, G, 1, Dg); A is (G, N, Dg); B_c is (T, B, G, N, 1).
    """
    torch.mul(delta_c, A, out=dA).exp_()
    torch.mul(delta_c * u_c, B_c, out=xs)


def _scan_states(dA, xs, x0):
    """In place: xs[t] <- dA[t] * x_{t-1} + xs[t], i.e. xs becomes the states x_t of the chunk.

    The only sequential part: one small in-place operation per step, everything else is one
    operation per chunk.
    """
    x = x0
    for a_t, x_t in zip(dA.unbind(0), xs.unbind(0), strict=True):
        x_t.addcmul_(a_t, x)
        x = x_t


def _l_major(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., L) -> (L, B, ...) contiguous: a copy."""
    return t.movedim(-1, 0).contiguous()


def _from_l_major(t: torch.Tensor) -> torch.Tensor:
    """(L, B, ...) -> (B, ..., L) contiguous: a copy."""
    return t.movedim(0, -1).contiguous()


class _ChunkedScan(torch.autograd.Function):
    """The core ``(u, delta, A, B, C) -> (y, last state)``: u, delta, y (B, D, L); A (D, N); B, C (B, G, N, L);
    last state (B, D, N).

    Inside, sequences are L-major (u, delta (L, B, D); B, C (L, B, G, N)), so that every step reads and
    writes one contiguous block, and states are (B, G, N, Dg) with Dg = D // G channels innermost; a
    chunk of T steps works in (T, B, G, N, Dg) buffers allocated once per call. Channels innermost
    makes every contraction over N a sum across rows of Dg-wide vectors or a (1, N) x (N, Dg) matrix
    product: on the CPU 2-8x faster than with N innermost, where sums over 16 contiguous values and
    (Dg, N) x (N, 1) products dominate (docs/scan.md). Inputs, outputs and gradients are transposed
    here, one explicit copy each, so that what runs around the core (softplus, the skip D, gradient
    accumulation) sees contiguous tensors instead of strided views.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        Bsz, Dch, L = u.shape
        G, N = B.shape[1], A.shape[1]
        Dg = Dch // G
        u, delta, B, C = _l_major(u), _l_major(delta), _l_major(B), _l_major(C)
        A = A.view(G, Dg, N).transpose(1, 2).contiguous()
        y = u.new_empty(L, Bsz, Dch)
        x = u.new_zeros(Bsz, G, N, Dg)
        dA_buf, xs_buf = (u.new_empty(min(chunk, L), Bsz, G, N, Dg) for _ in range(2))
        starts = []  # the state entering each chunk, all that backward needs to recompute the rest
        for s in range(0, L, chunk):
            e = min(s + chunk, L)
            T = e - s
            starts.append(x)
            dA, xs = dA_buf[:T], xs_buf[:T]  # the last chunk can be shorter
            d_c, u_c = delta[s:e].view(T, Bsz, G, 1, Dg), u[s:e].view(T, Bsz, G, 1, Dg)
            _chunk_inputs(A, d_c, u_c, B[s:e].unsqueeze(-1), dA, xs)
            _scan_states(dA, xs, x)
            # y_t = C_t . x_t: a (1, N) x (N, Dg) product per (step, batch, group)
            torch.bmm(C[s:e].view(-1, 1, N), xs.view(-1, N, Dg), out=y[s:e].view(-1, 1, Dg))
            x = xs[-1].clone()  # a copy: the buffer is overwritten by the next chunk
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        ctx.chunk = chunk
        return _from_l_major(y), x.transpose(2, 3).reshape(Bsz, Dch, N)

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, starts = ctx.saved_tensors
        chunk = ctx.chunk
        L, Bsz, Dch = u.shape
        G, N, Dg = A.shape
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        dA_param = torch.zeros_like(A)
        bufs = [u.new_empty(min(chunk, L), Bsz, G, N, Dg) for _ in range(3)]
        # carry = d loss / d x_{s-1} flowing back through step s of the chunk after this one
        if dlast is None:
            carry = u.new_zeros(Bsz, G, N, Dg)
        else:
            carry = dlast.view(Bsz, G, Dg, N).transpose(2, 3).contiguous()
        dy = _l_major(dy)
        for i in reversed(range(len(starts))):
            s = i * chunk
            e = min(s + chunk, L)
            T = e - s
            x0 = starts[i]
            dA, xs, g = (b[:T] for b in bufs)
            d_c, u_c = delta[s:e].view(T, Bsz, G, 1, Dg), u[s:e].view(T, Bsz, G, 1, Dg)
            dy_c = dy[s:e].view(T, Bsz, G, 1, Dg)
            _chunk_inputs(A, d_c, u_c, B[s:e].unsqueeze(-1), dA, xs)
            _scan_states(dA, xs, x0)
            # through y_t = C_t . x_t
            torch.bmm(dy_c.view(-1, 1, Dg), xs.view(-1, N, Dg).transpose(1, 2), out=dC[s:e].view(-1, 1, N))
            # g_t = dL/dx_t = dy_t C_t + dA_{t+1} g_{t+1}, reversed and in place in one buffer
            torch.mul(dy_c, C[s:e].unsqueeze(-1), out=g)
            g[-1].add_(carry)
            g_steps, dA_steps = g.unbind(0), dA.unbind(0)
            for t in range(T - 2, -1, -1):
                g_steps[t].addcmul_(dA_steps[t + 1], g_steps[t + 1])
            # through delta u B: gB = B_t . g_t as y above, dB = (delta u)_t . g_t
            gB = torch.bmm(B[s:e].view(-1, 1, N), g.view(-1, N, Dg)).view(T, Bsz, Dch)
            torch.mul(gB, delta[s:e], out=du[s:e])
            torch.mul(gB, u[s:e], out=ddelta[s:e])
            torch.bmm((d_c * u_c).view(-1, 1, Dg), g.view(-1, N, Dg).transpose(1, 2), out=dB[s:e].view(-1, 1, N))
            # through dA = exp(delta A): d(delta A)_t = g_t * dA_t * x_{t-1}
            h = g.mul_(dA)
            carry = h[0].clone()
            h[1:].mul_(xs[:-1])
            h[0].mul_(x0)
            # xs and dA are spent: their buffers take the products before the sums
            ddelta[s:e].view(T, Bsz, G, Dg).add_(torch.mul(h, A, out=xs).sum(3))
            dA_param += torch.mul(h, d_c, out=dA).sum((0, 1))
        dA_param = dA_param.transpose(1, 2).reshape(Dch, N)
        return _from_l_major(du), _from_l_major(ddelta), dA_param, _from_l_major(dB), _from_l_major(dC), None


def _chunked_core(chunk_size):
    def core(u, delta, A, B, C):
        Bsz, Dch, L = u.shape
        chunk = _chunk_len(Bsz, Dch, A.shape[1], L, u.element_size(), chunk_size)
        return _ChunkedScan.apply(u, delta, A, B, C, chunk)

    return core


# --- the alternatives: log-depth parallel scan and the naive reference --------------------------------


def _odd_even_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x_t = a_t x_{t-1} + b_t (x_0 = 0) along dim -2, in O(log L) depth and O(L) work.

    Combines neighbouring pairs, scans the half-length problem recursively, then fills in the even
    positions from their odd predecessors (the odd/even recursion behind Blelloch's scan).
    """
    L = a.shape[-2]
    if L == 1:
        return b
    if L % 2:
        a = F.pad(a, (0, 0, 0, 1), value=1.0)
        b = F.pad(b, (0, 0, 0, 1))
    a_e, a_o = a[..., 0::2, :], a[..., 1::2, :]
    b_e, b_o = b[..., 0::2, :], b[..., 1::2, :]
    x_o = _odd_even_scan(a_o * a_e, a_o * b_e + b_o)
    x_e = torch.cat([b_e[..., :1, :], a_e[..., 1:, :] * x_o[..., :-1, :] + b_e[..., 1:, :]], dim=-2)
    return torch.stack([x_e, x_o], dim=-2).flatten(-3, -2)[..., :L, :]


def _expand_groups(BC: torch.Tensor, Dch: int) -> torch.Tensor:
    """(B, G, N, L) -> (B, D, N, L), channel d reading group d // (D // G)."""
    return BC.repeat_interleave(Dch // BC.shape[1], dim=1)


def _parallel_core(u, delta, A, B, C):
    Dch = u.shape[1]
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None])  # (B, D, L, N)
    dBu = (delta * u).unsqueeze(-1) * _expand_groups(B, Dch).transpose(-1, -2)
    xs = _odd_even_scan(dA, dBu)
    y = torch.einsum("bdln,bdnl->bdl", xs, _expand_groups(C, Dch))
    return y, xs[:, :, -1]


def _ref_core(u, delta, A, B, C):
    Bsz, Dch, L = u.shape
    Bx, Cx = _expand_groups(B, Dch), _expand_groups(C, Dch)
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None])
    dBu = (delta * u).unsqueeze(-1) * Bx.transpose(-1, -2)
    x = u.new_zeros(Bsz, Dch, A.shape[1])
    ys = []
    for t in range(L):
        x = dA[:, :, t] * x + dBu[:, :, t]
        ys.append((x * Cx[..., t]).sum(-1))
    return torch.stack(ys, dim=2), x


# --- public functions, all with mamba_ssm's selective_scan_fn signature -------------------------------


def selective_scan_chunked(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    chunk_size: int | None = None,
):
    """The CPU fallback: sequential scan in chunks of ``chunk_size`` steps (default: CHUNK_BYTES)."""
    return _selective_scan(
        _chunked_core(chunk_size), u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


def selective_scan_parallel(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Log-depth parallel scan through autograd; memory O(L * N) per channel."""
    return _selective_scan(
        _parallel_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The per-step loop of mamba_ssm's ``selective_scan_ref`` through autograd; exact in float64."""
    return _selective_scan(_ref_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan: on CUDA tensors the selected implementation (``select_scan``), on others the
    chunked fallback. The fused kernel passes no gradient through the returned last state."""
    implementation = selected_scan() if u.is_cuda else "pytorch"
    return _run_scan(implementation, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _run_scan(
    implementation: str,
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
):
    """``selective_scan`` with the implementation named: "fused" (mamba_ssm's kernel) or "pytorch"."""
    if implementation == "pytorch":
        return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    # The kernel reads u, delta, B, C and z in one dtype and A, D, delta_bias in float32 (its checks).
    # Under autocast delta can be float32 beside a bfloat16 u: DC-Mamba's dt projection at dt_rank 1
    # is an einsum that multiplies rather than calling bmm, so autocast leaves it in float32.
    return FUSED_SELECTIVE_SCAN(
        u,
        _cast(delta, u.dtype),
        _cast(A, torch.float32),
        _cast(B, u.dtype),
        _cast(C, u.dtype),
        _cast(D, torch.float32),
        _cast(z, u.dtype),
        _cast(delta_bias, torch.float32),
        delta_softplus,
        return_last_state,
    )


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def compare_fused_with_fallback(
    device,
    seed: int = 0,
    batch: int = 2,
    channels: int = 768,
    length: int = 3136,
    d_state: int = 16,
    groups: int = 4,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """The fused kernel against the PyTorch scan on ``device``: {"y": e, "du": e, ..., "ddelta_bias": e}.

    Each e is the max abs difference of y or of one gradient divided by the max abs value of the
    PyTorch scan's: about ``dtype``'s rounding when the two agree (bfloat16: a few 1e-3), near 1 when
    they compute different things. One random scan as DC-Mamba calls it under CUDA training's
    bfloat16 autocast, by default at the first stage of the paper model (224 px input: L = 56 * 56,
    4 directions x 192 channels): u, delta and grouped B, C (B, ``groups``, N, L) in ``dtype``;
    A = -(1..N), D and delta_bias in float32; softplus on, z None, no last state; then the backward
    of a fixed random weighting of y.
    """
    if FUSED_SELECTIVE_SCAN is None:
        reason = fused_scan_unavailable_reason()
        raise RuntimeError(f"mamba_ssm's selective-scan kernel cannot be imported: {reason}")
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g)
    inputs = {
        "u": rnd(batch, channels, length).to(dtype),
        "delta": (0.5 * rnd(batch, channels, length)).to(dtype),
        "A": -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": rnd(batch, groups, d_state, length).to(dtype),
        "C": rnd(batch, groups, d_state, length).to(dtype),
        "D": rnd(channels),
        "delta_bias": 0.5 * rnd(channels) - 4.0,  # softplus: time steps around 0.02, as after Mamba's init
    }
    weight = rnd(batch, channels, length).to(device)
    results = {}
    for implementation in ("fused", "pytorch"):
        leaves = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
        y = _run_scan(implementation, **leaves, delta_softplus=True)
        grads = torch.autograd.grad((y.float() * weight).sum(), list(leaves.values()))
        results[implementation] = {"y": y.detach(), **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}
    fused, fallback = results["fused"], results["pytorch"]
    return {
        k: ((fused[k].float() - fallback[k].float()).abs().max() / fallback[k].float().abs().max()).item()
        for k in fused
    }


# --- VMamba's cross-scan over four directions ---------------------------------------------------------


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed."""
    xs = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], dim=1)
    return torch.cat([xs, xs.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor) -> torch.Tensor:
    """(B, 4, C, H, W) -> (B, C, H*W): sum of the four directions, each back in row-major order.

    ``ys`` holds the four scanned sequences of ``cross_scan`` viewed as (H, W) (the column-major ones
    are still in their scan order), so ``cross_merge(cross_scan(x).view(B, 4, C, H, W))`` is
    ``4 * x.flatten(2)``.
    """
    Bsz, _, Ch, H, W = ys.shape
    ys = ys.flatten(3)
    y = ys[:, :2] + ys[:, 2:].flip(-1)
    return y[:, 0] + y[:, 1].reshape(Bsz, Ch, W, H).transpose(2, 3).flatten(2)
