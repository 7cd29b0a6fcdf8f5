"""The fused scan's calling convention against mamba-ssm's real compiled extension, where `make kernels`
installed it; skipped elsewhere. CI does not build it: 34 minutes of wall time on this project's shared
2-core machine, beside the 45 that CI takes of its 90 (docs/environment.md).

Without a GPU the kernel cannot run, but everything before its launch does: pybind11 matches the
arguments against the C++ signatures of ``selective_scan_cuda.fwd`` and ``bwd``, then the extension checks
the inputs' dtypes, and only then that they are CUDA tensors. So a call that fails with "Expected
u.is_cuda() to be true" passed the argument list and the dtype checks of the real extension. On a GPU,
``python -m pathmamba doctor`` runs the kernel against the PyTorch scan (docs/scan.md).
"""

import functools
import importlib.util
import inspect
import re

import pytest
import torch
from test_scan_fused_convention import _bwd, _fwd

from pathmamba.models import cmb, scan
from pathmamba.models.cmb import DCMamba

SPEC = importlib.util.find_spec("selective_scan_cuda")
pytestmark = pytest.mark.skipif(
    SPEC is None or not str(SPEC.origin).endswith(".so"),
    reason="mamba-ssm's compiled selective_scan_cuda is not installed here (`make kernels`, docs/environment.md)")
NOT_CUDA = r"Expected u\.is_cuda\(\) to be true"


@pytest.fixture(scope="module")
def extension():
    import selective_scan_cuda

    return selective_scan_cuda


def pybind_arguments(function) -> list[str]:
    """The argument types of a pybind11 function, from the signature line of its docstring."""
    signature = function.__doc__.splitlines()[0]
    return re.findall(r"arg\d+: ([^,)]+(?:\[[^]]*\])?)", signature)


def test_the_extension_imports_beside_torch_and_the_scan_module_takes_it(extension):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    print(f"\n{extension.__file__} beside torch {torch.__version__} (CUDA {torch.version.cuda})")
    assert scan.fused_scan_unavailable_reason() is None
    assert scan.FUSED_SELECTIVE_SCAN is selective_scan_fn


def test_the_cpu_stand_in_has_the_extensions_argument_lists(extension):
    # tests/test_scan_fused_convention.py's stand-in: the same arguments, the optional ones where the
    # extension takes None
    for real, stand_in in ((extension.fwd, _fwd), (extension.bwd, _bwd)):
        types = pybind_arguments(real)
        names = list(inspect.signature(stand_in).parameters)
        print(f"{real.__name__}: {list(zip(names, types, strict=True))}")
        optional = [name for name, kind in zip(names, types, strict=True) if "None" in kind or "Optional" in kind]
        assert optional == [name for name in names if name in ("D", "z", "delta_bias", "x", "out", "dz")]
        assert [kind for kind in types if kind == "bool"] == ["bool"] * (1 if real is extension.fwd else 2)


def test_pathmambas_fused_call_passes_the_extensions_checks_up_to_the_gpu(extension):
    # DCMamba at width 16 (dt_rank 1) under bf16 autocast: delta stays float32 beside a bf16 u, which the
    # extension refuses; the fused path casts it (docs/scan.md). Both reach the extension for real.
    torch.manual_seed(0)
    block = DCMamba(16, d_state=16)
    x = torch.randn(1, 3, 4, 16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cmb, "selective_scan", functools.partial(scan._run_scan, "fused"))
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match=NOT_CUDA):
            block(x)
    u, delta = torch.randn(1, 4, 6, dtype=torch.bfloat16), torch.rand(1, 4, 6)
    A, B, C = -torch.rand(4, 3), torch.randn(1, 2, 3, 6, dtype=torch.bfloat16), torch.randn(1, 2, 3, 6)
    with pytest.raises(RuntimeError, match=r"Expected delta\.scalar_type\(\) == input_type to be true"):
        scan.FUSED_SELECTIVE_SCAN(u, delta, A, B, C)
    with pytest.raises(RuntimeError, match=NOT_CUDA):
        scan._run_scan("fused", u, delta, A, B, C, D=torch.rand(4), delta_bias=torch.rand(4), delta_softplus=True)


def test_the_backward_entry_takes_selective_scan_fns_arguments(extension):
    # SelectiveScanFn.backward's call: u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, softplus,
    # recompute_out_z
    u, delta, A = torch.randn(1, 4, 6), torch.rand(1, 4, 6), -torch.rand(4, 3)
    B, C, D = torch.randn(1, 1, 3, 6), torch.randn(1, 1, 3, 6), torch.rand(4)
    x = torch.zeros(1, 4, 1, 6)
    with pytest.raises(RuntimeError, match=NOT_CUDA):
        extension.bwd(u, delta, A, B, C, D, None, torch.rand(4), torch.ones_like(u), x, None, None, True, False)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        extension.bwd(u, delta, A, B, C, D, None, torch.rand(4), torch.ones_like(u), x, None, True, False)
