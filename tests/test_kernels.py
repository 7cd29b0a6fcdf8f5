"""pathmamba.operations.kernels (`make kernels`): what it checks and changes before compiling mamba-ssm's extension.

The build itself (tens of minutes) is not run here: docs/environment.md gives the one measured on this
project's machine, and tests/test_scan_fused_convention.py checks the extension it installs where present.
The changes to mamba-ssm's setup.py are checked against the real one of the pinned version, downloaded
with pip as `make kernels` does (skipped without PyPI, unless PATHMAMBA_REQUIRE_MAMBA_SOURCE=1).
"""

import os
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import REPO

from pathmamba.operations import kernels
from pathmamba.operations.envfiles import read_pins


@pytest.fixture(scope="session")
def mamba_setup_py(request) -> str:
    """setup.py of constraints.txt's mamba-ssm, from its source distribution (cached by pytest)."""
    version = kernels.pinned_version(REPO / "constraints.txt")
    folder = request.config.cache.mkdir("mamba-ssm-sdist")
    sdist = folder / f"mamba_ssm-{version}.tar.gz"
    if not sdist.exists():
        try:
            kernels.download_sdist(version, folder)
        except subprocess.CalledProcessError as error:
            if os.environ.get("PATHMAMBA_REQUIRE_MAMBA_SOURCE") == "1":
                pytest.fail(f"pip could not download {kernels.PACKAGE}=={version}'s source: {error}")
            pytest.skip(f"pip could not download {kernels.PACKAGE}=={version}'s source (is PyPI reachable?)")
    with tarfile.open(sdist) as archive:
        return archive.extractfile(f"mamba_ssm-{version}/setup.py").read().decode()


def test_the_pinned_version_is_the_one_the_docs_measured():
    assert kernels.pinned_version(REPO / "constraints.txt") == "2.3.2.post1"
    # what make kernels installs beside the wheel is pinned too
    pins = read_pins(REPO / "constraints.txt")
    for requirement in kernels.companion_requirements(REPO / "pyproject.toml"):
        assert requirement.split(">")[0] in pins, requirement


def test_setup_py_gets_cxx20_and_only_the_architectures_asked_for(mamba_setup_py):
    assert mamba_setup_py.count("-std=c++17") == 4  # cxx and nvcc flags, CUDA and ROCm branches
    assert mamba_setup_py.count('"-gencode"') == 9  # sm_75 ... sm_121, whatever TORCH_CUDA_ARCH_LIST says
    patched = kernels.patch_setup(mamba_setup_py, ["9.0", "8.6"])
    compile(patched, "setup.py", "exec")
    assert "-std=c++17" not in patched and patched.count("-std=c++20") == 4
    replaced = "    cc_flag = ['-gencode', 'arch=compute_90,code=sm_90', '-gencode', 'arch=compute_86,code=sm_86']\n"
    assert patched.count(replaced) == 1
    # after the last line that adds to the list, before the flags are put together from it
    where = patched.index(replaced)
    assert patched.rindex("cc_flag.append(", 0, where) < where < patched.index("extra_compile_args = {", where)


def test_a_setup_py_that_is_not_the_tested_one_is_refused():
    with pytest.raises(kernels.KernelBuildError, match="not the one this build changes"):
        kernels.patch_setup("cc_flag = []\nextra_compile_args = {'nvcc': ['-std=c++20']}\n", ["9.0"])


def test_architectures_are_compute_capabilities():
    assert kernels.gencode_flags(["12.0"]) == ["-gencode", "arch=compute_120,code=sm_120"]
    with pytest.raises(kernels.KernelBuildError, match=r"'sm_90': expected a compute capability such as 9\.0"):
        kernels.gencode_flags(["sm_90"])


def test_parallel_jobs_fit_the_memory():
    gib = 2**30
    assert kernels.parallel_jobs(16, 128 * gib) == 16
    assert kernels.parallel_jobs(16, 20 * gib) == 20 // kernels.GIB_PER_JOB
    assert kernels.parallel_jobs(8, 1 * gib) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, `make kernels` would start the build")
def test_without_a_gpu_the_architecture_must_be_given():
    done = subprocess.run([sys.executable, "-m", "pathmamba.operations.kernels"], capture_output=True, text=True, cwd=REPO,
                          check=False)
    assert done.returncode == 2
    assert "torch sees no CUDA GPU here: give the architecture to build for, e.g. `--arch 9.0`" in done.stderr


def test_nvcc_must_know_the_architecture():
    toolkit = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if not os.path.exists(os.path.join(toolkit, "bin", "nvcc")) or torch.version.cuda is None:
        pytest.skip(f"no nvcc in {toolkit} (CUDA_HOME), or a CPU-only torch")
    done = subprocess.run([sys.executable, "-m", "pathmamba.operations.kernels", "--arch", "3.0"], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, CUDA_HOME=toolkit), check=False)
    assert done.returncode == 2
    assert "nvcc cannot compile for 3.0; it knows compute_75" in done.stderr
