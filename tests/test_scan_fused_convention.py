"""The fused scan's calling convention on the CPU: mamba_ssm's own ``selective_scan_fn`` over a CPU
stand-in for its compiled ``selective_scan_cuda`` extension.

The stand-in has the extension's ``fwd`` and ``bwd`` argument lists and return values (mamba_ssm
2.3.2.post1, csrc/selective_scan/selective_scan.cpp), makes the same dtype, shape and stride checks, and
computes the scan with our chunked scan in float64. So these tests show that what PathMamba passes goes
through mamba_ssm's ``SelectiveScanFn`` (its layout changes, the argument order of its kernel calls, the
unpacking of its gradients) and comes back as the PyTorch scan's results. The CUDA kernel's arithmetic
itself is checked on a GPU by ``python -m pathmamba doctor`` (``compare_fused_with_fallback``).

mamba_ssm's Python package is installed without its CUDA build and without its dependencies into the
pytest cache on first use (about 5 s). Without PyPI these tests skip, unless
PATHMAMBA_REQUIRE_MAMBA_SOURCE=1 (CI) makes that a failure.
"""

import collections
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

from pathmamba.models import cmb, scan
from pathmamba.models.cmb import DCMamba
from pathmamba.models.scan import selective_scan_chunked

MAMBA_SSM = "mamba-ssm==2.3.2.post1"
EINOPS = "einops==0.8.2"  # imported by mamba_ssm's selective_scan_interface
KERNEL_CHUNK = 2048  # the kernel keeps one state per chunk of this many steps for its backward


@pytest.fixture(scope="session")
def mamba_ssm_source(request) -> Path:
    """A folder holding mamba_ssm's Python package and einops, installed once into the pytest cache."""
    parent = request.config.cache.mkdir("mamba-ssm")
    target = parent / MAMBA_SSM.split("==")[1]
    if not (target / "mamba_ssm" / "ops" / "selective_scan_interface.py").exists():
        staging = Path(tempfile.mkdtemp(dir=parent))
        # FORCE_BUILD: build here rather than download a prebuilt CUDA wheel; SKIP_CUDA_BUILD: Python only
        env = dict(os.environ, MAMBA_FORCE_BUILD="TRUE", MAMBA_SKIP_CUDA_BUILD="TRUE")
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--retries", "1", "--timeout", "20", "--no-deps", "--no-build-isolation",
                   "--target", str(staging), MAMBA_SSM, EINOPS]
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            shutil.rmtree(staging)
            message = (f"pip could not install {MAMBA_SSM} without its CUDA build (is PyPI reachable?): "
                       f"{done.stderr.strip()[-1500:]}")
            if os.environ.get("PATHMAMBA_REQUIRE_MAMBA_SOURCE") == "1":
                pytest.fail(message)
            pytest.skip(message)
        staging.rename(target)  # whole or not at all: a half-installed folder is never reused
    return target


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(f"selective_scan_cuda rejects this call: {what}")


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.size(-1) == 1


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """The extension's checks on its inputs, less ``is_cuda``; complex A and input-independent B, C of
    shape (D, N) are left out: PathMamba uses neither."""
    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    given = {name: t for name, t in inputs.items() if t is not None}
    _check(u.dtype in (torch.float32, torch.float16, torch.bfloat16), f"u is {u.dtype}")
    _check(B.dim() == 4 and C.dim() == 4, "B and C are not (batch, groups, N, L)")
    batch, dim, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    _check(state <= 256, f"state dimension {state} > 256")
    expected = {"delta": (batch, dim, length), "A": (dim, state), "B": (batch, groups, state, length),
                "C": (batch, groups, state, length), "z": (batch, dim, length), "D": (dim,),
                "delta_bias": (dim,)}
    for name, t in given.items():
        dtype = torch.float32 if name in ("A", "D", "delta_bias") else u.dtype
        _check(t.dtype == dtype, f"{name} is {t.dtype}, expected {dtype}")
        _check(name == "u" or tuple(t.shape) == expected[name], f"{name} is {tuple(t.shape)}, expected "
                                                                 f"{expected.get(name)}")
        _check(name == "A" or _last_dim_contiguous(t), f"{name} has stride {t.stride(-1)} in its last dim")


def _float64_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """(leaves, y): float64 copies of the given inputs that require grad, and our chunked scan of them."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in
              (u, delta, A, B, C, D, z, delta_bias)]
    return leaves, selective_scan_chunked(*leaves, delta_softplus=delta_softplus)


def _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The extension's forward: [out, x] and out_z with z; out is y before the gate silu(z)."""
    selective_scan_cuda.calls["fwd"] += 1
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    state = A.shape[1]
    _, y = _float64_scan(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
    out = torch.empty_like(delta).copy_(y)
    # x: the state at the end of each chunk at odd positions; at even ones the kernel keeps running
    # decay products that SelectiveScanFn never reads: NaN here, so that a reader would show.
    chunks = math.ceil(length / KERNEL_CHUNK)
    x = torch.full((batch, dim, chunks, 2 * state), math.nan, dtype=torch.float32)
    for chunk in range(chunks):
        end = min((chunk + 1) * KERNEL_CHUNK, length)
        _, last = selective_scan_chunked(
            u[..., :end].double(), delta[..., :end].double(), A.double(), B[..., :end].double(),
            C[..., :end].double(), delta_bias=None if delta_bias is None else delta_bias.double(),
            delta_softplus=delta_softplus, return_last_state=True,
        )
        x[:, :, chunk, 1::2] = last
    if z is None:
        return [out, x]
    return [out, x, torch.empty_like(z).copy_(y * torch.nn.functional.silu(z.double()))]


def _bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    """The extension's backward: [du, ddelta, dA, dB, dC, dD, ddelta_bias] and dz with z."""
    selective_scan_cuda.calls["bwd"] += 1
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    _check(dout.dtype == u.dtype and dout.shape == u.shape and _last_dim_contiguous(dout), "dout")
    chunks = math.ceil(u.shape[2] / KERNEL_CHUNK)
    _check(x is not None or chunks == 1, "x is needed with more than one chunk")
    _check(x is None or (x.dtype == torch.float32 and x.is_contiguous()
                         and x.shape == (*u.shape[:2], chunks, 2 * A.shape[1])), "x")
    _check(z is None or (out is not None and out.dtype == u.dtype and out.shape == u.shape), "out with z")
    _check(dz is None and not recompute_out_z, "dz buffer or out_z recompute (SelectiveScanFn asks neither)")
    with torch.enable_grad():  # autograd runs backward functions without it
        leaves, y = _float64_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dout.double()))
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = (None if t is None else next(grads) for t in leaves)
    result = [torch.empty_like(u).copy_(du), torch.empty_like(delta).copy_(ddelta), dA.float(),
              dB.to(B.dtype), dC.to(C.dtype), None if dD is None else dD.float(),
              None if ddelta_bias is None else ddelta_bias.float()]
    return result if z is None else [*result, torch.empty_like(z).copy_(dz)]


selective_scan_cuda = types.ModuleType("selective_scan_cuda")
selective_scan_cuda.fwd, selective_scan_cuda.bwd = _fwd, _bwd
selective_scan_cuda.calls = collections.Counter()


@pytest.fixture(scope="module")
def mamba_selective_scan_fn(mamba_ssm_source):
    """mamba_ssm's ``selective_scan_fn``, imported by ``scan._load_fused`` over the CPU stand-in."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(mamba_ssm_source))
        patch.setitem(sys.modules, "selective_scan_cuda", selective_scan_cuda)
        # The package's __init__ imports its language models (transformers, tilelang, ...): start from an
        # empty package, so that only the ops subpackage and what it imports are loaded.
        package = types.ModuleType("mamba_ssm")
        package.__path__ = [str(mamba_ssm_source / "mamba_ssm")]
        patch.setitem(sys.modules, "mamba_ssm", package)
        for name in [name for name in sys.modules if name.startswith("mamba_ssm.")]:
            patch.delitem(sys.modules, name)  # an installed mamba_ssm's, bound to the real extension
        fused, reason = scan._load_fused()
        assert reason is None, reason
        yield fused
        for name in [name for name in sys.modules if name.startswith("mamba_ssm.")]:
            del sys.modules[name]


@pytest.fixture
def kernel(monkeypatch, mamba_selective_scan_fn):
    """The scan module as on a CUDA machine with the kernel; returns the stand-in (its call counts)."""
    monkeypatch.setattr(scan, "FUSED_SELECTIVE_SCAN", mamba_selective_scan_fn)
    monkeypatch.setattr(scan, "_FUSED_UNAVAILABLE_REASON", None)
    monkeypatch.setattr(scan, "_selected", None)
    selective_scan_cuda.calls.clear()
    return selective_scan_cuda


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max |got - want| <= tol * max |want|: bfloat16 rounding is relative to the values' scale."""
    error = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert error <= tol * scale, f"{what}: max abs difference {error:.3g}, scale {scale:.3g}"


# d_model 16: dt_rank 1, where autocast leaves delta in float32 beside a bfloat16 u; 48: dt_rank 3
@pytest.mark.parametrize("d_model", [16, 48])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_dcmamba_through_mamba_ssm_matches_the_pytorch_scan(kernel, monkeypatch, d_model, autocast):
    torch.manual_seed(0)
    block = DCMamba(d_model, d_state=16)
    x = torch.randn(2, 5, 7, d_model)  # a grid that is not square: rows and columns scan differently
    weight = torch.randn(2, 5, 7, d_model)

    def forward_backward():
        block.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = block(x)
        (y.float() * weight).sum().backward()
        return y.detach(), {name: p.grad.clone() for name, p in block.named_parameters()}

    y_want, grads_want = forward_backward()
    assert kernel.calls == {}
    # the branch selective_scan takes for CUDA tensors with the fused scan selected, here for CPU ones
    monkeypatch.setattr(cmb, "selective_scan", functools.partial(scan._run_scan, "fused"))
    y_got, grads_got = forward_backward()
    assert kernel.calls == {"fwd": 1, "bwd": 1}
    tol = 2e-2 if autocast else 1e-5
    assert_close_to_scale(y_got, y_want, tol, "y")
    for name, grad in grads_want.items():
        assert_close_to_scale(grads_got[name], grad, tol, f"d {name}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compare_fused_with_fallback_over_two_kernel_chunks(kernel, dtype, tol):
    # L > 2048: the kernel's state buffer x has two chunks, the last of which holds the last state
    errors = scan.compare_fused_with_fallback("cpu", batch=1, channels=8, length=2100, d_state=4, groups=2,
                                              dtype=dtype)
    assert kernel.calls == {"fwd": 1, "bwd": 1}
    assert set(errors) == {"y", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"}
    assert max(errors.values()) < tol, errors


def test_last_state_comes_from_the_kernels_state_buffer(kernel):
    inputs = [torch.randn(1, 4, 2100), torch.randn(1, 4, 2100) - 3, -torch.rand(4, 3) - 0.5,
              torch.randn(1, 2, 3, 2100), torch.randn(1, 2, 3, 2100)]
    _, last_got = scan._run_scan("fused", *inputs, delta_softplus=True, return_last_state=True)
    _, last_want = selective_scan_chunked(*inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(last_got, last_want, atol=1e-5, rtol=1e-5)


def test_ungrouped_B_C_and_the_gate_z_through_mamba_ssm(kernel):
    # beyond PathMamba's call: (B, N, L) inputs that SelectiveScanFn reshapes, and out_z and dz
    g = torch.Generator().manual_seed(0)
    shapes = {"u": (2, 4, 9), "delta": (2, 4, 9), "A": (4, 3), "B": (2, 3, 9), "C": (2, 3, 9), "z": (2, 4, 9)}
    inputs = [torch.randn(*shape, generator=g) for shape in shapes.values()]
    inputs[1], inputs[2] = inputs[1].abs(), -inputs[2].abs()  # positive time steps, a decaying state
    results = []
    for scan_fn in (functools.partial(scan._run_scan, "fused"), selective_scan_chunked):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = scan_fn(*leaves[:5], z=leaves[5])
        results.append([y, *torch.autograd.grad(y, leaves, torch.ones_like(y))])
    assert kernel.calls == {"fwd": 1, "bwd": 1}
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_path_casts_to_the_dtypes_the_kernel_checks(kernel, mamba_selective_scan_fn):
    u, delta = torch.randn(1, 4, 6, dtype=torch.bfloat16), torch.randn(1, 4, 6)  # as at dt_rank 1
    A, B, C = -torch.rand(4, 3), torch.randn(1, 2, 3, 6, dtype=torch.bfloat16), torch.randn(1, 2, 3, 6)
    with pytest.raises(RuntimeError, match=r"delta is torch\.float32"):
        mamba_selective_scan_fn(u, delta, A, B, C)
    y = scan._run_scan("fused", u, delta, A, B, C, delta_softplus=True)
    want = selective_scan_chunked(u, delta.bfloat16(), A, B, C.bfloat16(), delta_softplus=True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want)


def test_selection_with_the_kernel_importable(kernel, caplog):
    cuda = torch.device("cuda")  # only named: nothing is allocated on it
    assert scan.select_scan("auto", cuda) == "fused"
    assert scan.selected_scan() == "fused"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert scan.select_scan("fused", cuda) == "fused"
    with pytest.raises(RuntimeError, match="CUDA only"):
        scan.select_scan("fused", "cpu")
    # CPU tensors run the PyTorch scan whatever is selected
    scan.selective_scan(torch.randn(1, 4, 5), torch.rand(1, 4, 5), -torch.rand(4, 3), torch.randn(1, 1, 3, 5),
                        torch.randn(1, 1, 3, 5))
    assert kernel.calls == {}
