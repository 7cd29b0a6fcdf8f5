"""The selective scan implementations against a float64 reference, and the cross-scan layout."""

import sys

import pytest
import torch

from pathmamba.models import scan
from pathmamba.models.scan import (
    cross_merge,
    cross_scan,
    selective_scan,
    selective_scan_chunked,
    selective_scan_parallel,
    selective_scan_ref,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(Bsz, Dch, L, N, G, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    bc = (Bsz, N, L) if G is None else (Bsz, G, N, L)
    return {
        "u": rnd(Bsz, Dch, L),
        "delta": rnd(Bsz, Dch, L, scale=0.5, shift=-1.0),  # around softplus^-1 of dt ~ 0.3
        "A": -torch.exp(rnd(Dch, N, scale=0.5)),  # negative: a stable recurrence, as in Mamba
        "B": rnd(*bc),
        "C": rnd(*bc),
        "D": rnd(Dch),
        "z": rnd(Bsz, Dch, L),
        "delta_bias": rnd(Dch, scale=0.1),
    }


def run(fn, inputs, use, softplus, last_state, **kw):
    """Outputs and the gradients of every used input, for a loss touching y and the last state."""
    ts = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in use}
    out = fn(
        *(ts[k] for k in NAMES[:5]),
        **{k: ts.get(k) for k in NAMES[5:]},
        delta_softplus=softplus,
        return_last_state=last_state,
        **kw,
    )
    y, last = out if last_state else (out, None)
    # fixed random weights so that every output element matters differently
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    loss = (y * w).sum() + (last.square().sum() if last is not None else 0)
    # allow_unused: at L = 1 the state starts at zero, so A has no effect and a zero gradient
    grads = torch.autograd.grad(loss, list(ts.values()), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(ts.values(), grads, strict=True)]
    return y, last, dict(zip(ts, grads, strict=True))


SHAPES = [  # Bsz, D, L, N, G
    (2, 4, 1, 3, None),
    (1, 6, 2, 2, None),
    (2, 8, 37, 4, None),
    (2, 8, 37, 4, 2),
    (1, 12, 64, 16, 4),
]
OPTIONS = [  # optional inputs used, softplus, last state
    (frozenset(), False, False),
    (frozenset({"D"}), True, True),
    (frozenset({"z"}), False, True),
    (frozenset({"delta_bias"}), True, False),
    (frozenset({"D", "z", "delta_bias"}), True, True),
]


def assert_matches(got, want, atol, rtol, what):
    y, last, grads = got
    y_ref, last_ref, grads_ref = want
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    if last_ref is not None:
        torch.testing.assert_close(
            last.double(), last_ref, atol=atol, rtol=rtol, msg=lambda m: f"{what} last state: {m}"
        )
    for k in grads_ref:
        torch.testing.assert_close(
            grads[k].double(), grads_ref[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{what} d{k}: {m}"
        )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-D{}-L{}-N{}-G{}".format(*s))
@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: "+".join(sorted(o[0])) + f"-sp{o[1]:d}-last{o[2]:d}"
)
def test_fallback_matches_float64_reference(shape, options):
    extra, softplus, last_state = options
    use = set(NAMES[:5]) | extra
    inputs = make_inputs(*shape)
    if not softplus:  # the caller passes time steps already positive; negative ones would blow x up
        inputs["delta"] = torch.nn.functional.softplus(inputs["delta"])
    want = run(selective_scan_ref, inputs, use, softplus, last_state)
    # float64: the same arithmetic, so only rounding differs; chunk sizes that split L unevenly
    for chunk in (1, 3, None):
        got = run(selective_scan_chunked, inputs, use, softplus, last_state, chunk_size=chunk)
        assert_matches(got, want, atol=1e-10, rtol=1e-10, what=f"chunked float64 chunk={chunk}")
    got = run(selective_scan_parallel, inputs, use, softplus, last_state)
    assert_matches(got, want, atol=1e-10, rtol=1e-10, what="parallel float64")
    # float32, as the model runs it, against the float64 reference
    inputs32 = {k: v.float() for k, v in inputs.items()}
    got = run(selective_scan_chunked, inputs32, use, softplus, last_state, chunk_size=5)
    assert_matches(got, want, atol=2e-4, rtol=2e-4, what="chunked float32")


def test_reference_matches_hand_computed_recurrence():
    # one channel, one state: x_t = exp(dt_t a) x_{t-1} + dt_t b_t u_t, y_t = c_t x_t + d u_t
    u, dt, b, c = [0.5, -1.0, 2.0], [0.1, 0.2, 0.3], [1.0, 2.0, -1.0], [0.5, 1.0, 2.0]
    a, d = -0.7, 0.3
    x, want = 0.0, []
    for t in range(3):
        x = torch.exp(torch.tensor(dt[t] * a, dtype=torch.float64)).item() * x + dt[t] * b[t] * u[t]
        want.append(c[t] * x + d * u[t])
    t64 = lambda v: torch.tensor(v, dtype=torch.float64)
    y = selective_scan_ref(t64([[u]]), t64([[dt]]), t64([[a]]), t64([[b]]), t64([[c]]), D=t64([d]))
    torch.testing.assert_close(y, t64([[want]]), atol=1e-12, rtol=1e-12)


def test_dispatch_uses_fallback_on_cpu_and_keeps_dtype():
    inputs = make_inputs(2, 8, 10, 4, 2, dtype=torch.float32)
    args = [inputs[k] for k in NAMES[:5]]
    y = selective_scan(*args, D=inputs["D"], delta_softplus=True)
    torch.testing.assert_close(y, selective_scan_chunked(*args, D=inputs["D"], delta_softplus=True))
    # half-precision inputs scan in float32 and return u's dtype, the last state in float32
    y16, last = selective_scan(*(a.bfloat16() for a in args), return_last_state=True)
    assert y16.dtype == torch.bfloat16 and last.dtype == torch.float32


@pytest.fixture
def no_kernel(monkeypatch):
    """The scan module as where mamba_ssm's extension cannot be imported, nothing selected yet."""
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)  # makes the import raise
    fused, reason = scan._load_fused()
    monkeypatch.setattr(scan, "FUSED_SELECTIVE_SCAN", fused)
    monkeypatch.setattr(scan, "_FUSED_UNAVAILABLE_REASON", reason)
    monkeypatch.setattr(scan, "_selected", None)


def test_fused_import_is_guarded_and_says_why(no_kernel):
    assert scan.FUSED_SELECTIVE_SCAN is None
    assert "selective_scan_cuda" in scan.fused_scan_unavailable_reason()


def test_select_scan_rejects_an_unknown_name(no_kernel):
    with pytest.raises(ValueError, match="'triton' is not one of auto, fused, pytorch"):
        scan.select_scan("triton", "cpu")


def test_select_fused_without_the_kernel_says_why_and_what_to_do(no_kernel):
    with pytest.raises(RuntimeError, match="cannot be imported") as raised:
        scan.select_scan("fused", torch.device("cuda"))  # only named: nothing is allocated on it
    message = str(raised.value)
    assert "selective_scan_cuda" in message and "`make kernels`" in message and "scan: pytorch" in message


def test_select_fused_on_the_cpu_is_an_error(no_kernel):
    with pytest.raises(RuntimeError, match="CUDA only"):
        scan.select_scan("fused", "cpu")


def test_auto_and_pytorch_on_the_cpu_select_pytorch_quietly(no_kernel, caplog):
    assert scan.select_scan("auto", "cpu") == "pytorch"
    assert scan.selected_scan() == "pytorch"
    assert scan.select_scan("pytorch", torch.device("cuda")) == "pytorch"
    assert not caplog.records


def test_auto_on_cuda_without_the_kernel_warns(no_kernel, caplog):
    assert scan.select_scan("auto", torch.device("cuda")) == "pytorch"
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "selective_scan_cuda" in record.getMessage() and "slower" in record.getMessage()


def test_first_cuda_scan_without_a_selection_selects_auto(no_kernel, caplog):
    assert scan.selected_scan() == "pytorch"
    assert [r.levelname for r in caplog.records] == ["WARNING"]


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 6), (7, 4)])
def test_cross_merge_of_cross_scan_is_four_times_identity(hw):
    H, W = hw
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, H * W)
    # the four directions: row-major, column-major, and both reversed
    torch.testing.assert_close(xs[:, 0], x.flatten(2))
    torch.testing.assert_close(xs[:, 1], x.transpose(2, 3).flatten(2))
    torch.testing.assert_close(xs[:, 2], x.flatten(2).flip(-1))
    torch.testing.assert_close(xs[:, 3], x.transpose(2, 3).flatten(2).flip(-1))
    torch.testing.assert_close(cross_merge(xs.view(2, 4, 3, H, W)), 4 * x.flatten(2))
