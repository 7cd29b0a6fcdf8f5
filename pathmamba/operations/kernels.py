"""``python -m pathmamba.operations.kernels`` (``make kernels``): compile mamba-ssm's fused selective-scan CUDA
extension (``selective_scan_cuda``) for this machine's GPU and install it into the running Python's
environment, with what ``import mamba_ssm`` needs (the ``mamba`` extra, pinned by constraints.txt).

mamba-ssm is published as source only and has no prebuilt wheel for torch 2.14, so it is always compiled.
The setup script of the version pinned in constraints.txt (2.3.2.post1) cannot build it unchanged:

- it compiles with ``-std=c++17``, and torch 2.14's headers refuse anything older than C++20 (upstream
  state-spaces/mamba#1000, open): here both become ``-std=c++20``;
- it hard-codes nine GPU architectures (sm_75 to sm_121) and ignores ``TORCH_CUDA_ARCH_LIST``: nine
  times the compile time and memory. Here they are replaced by the architectures asked for.

Steps: check nvcc (its CUDA major must be torch's) and the host compiler nvcc will use, download the
pinned source distribution with pip (or take ``--sdist``), unpack it into a temporary folder, make the two
changes, ``pip wheel`` it with ``MAMBA_FORCE_BUILD=TRUE`` (compile here, no download of a prebuilt wheel)
and ``MAX_JOBS`` sized to the memory available, keep the wheel in ``--wheel-dir`` (for other machines with
the same GPU architecture), and install it without its dependencies: the others it lists (tilelang,
quack-kernels, apache-tvm-ffi) serve Mamba-3 and are imported only where present. Measurements and the
manual way: docs/environment.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from pathmamba.core.layout import REPO
from pathmamba.operations.envfiles import read_pins

PACKAGE = "mamba-ssm"
#: Memory of one compile job, with headroom: on this project's build (one architecture, two jobs;
#: docs/environment.md) the largest process peaked at 1.5 GiB and the whole build at 2.5 GiB.
GIB_PER_JOB = 2
#: nvcc 13.0 refuses a GNU host compiler newer than this (its crt/host_config.h).
NEWEST_GCC = 15
#: Where setup.py builds its list of -gencode flags, and the line after which the list is replaced.
ARCH_LIST_ANCHOR = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"


class KernelBuildError(Exception):
    """A reason the build cannot start or did not succeed, naming what to change."""


def pinned_version(constraints: Path) -> str:
    pins = read_pins(constraints)
    if PACKAGE not in pins:
        raise KernelBuildError(f"{constraints}: no pin for {PACKAGE}; add a line '{PACKAGE}==<version>'")
    return pins[PACKAGE]


def companion_requirements(pyproject: Path) -> list[str]:
    """The ``mamba`` extra of pyproject.toml: what is installed beside the compiled wheel."""
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["mamba"]


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc's ``-gencode`` flags for compute capabilities such as "9.0": real code for each (sm_90)."""
    flags = []
    for arch in archs:
        if not re.fullmatch(r"\d+\.\d+", arch):
            raise KernelBuildError(f"GPU architecture {arch!r}: expected a compute capability such as 9.0 "
                                   "(H100), 8.0 (A100), 8.6 (RTX 30xx, A40) or 12.0 (RTX 50xx)")
        number = arch.replace(".", "")
        flags += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    return flags


def patch_setup(text: str, archs: list[str]) -> str:
    """mamba-ssm's setup.py with C++20 and only the ``archs``' -gencode flags (see the module's notes)."""
    if text.count(ARCH_LIST_ANCHOR) != 1 or "-std=c++17" not in text:
        raise KernelBuildError("mamba-ssm's setup.py is not the one this build changes (no -std=c++17 or no "
                               f"{ARCH_LIST_ANCHOR.strip()!r} line): is constraints.txt's version the tested one?")
    text = text.replace("-std=c++17", "-std=c++20")
    return text.replace(ARCH_LIST_ANCHOR, f"    cc_flag = {gencode_flags(archs)!r}\n\n{ARCH_LIST_ANCHOR}")


def detected_archs() -> list[str]:
    """The compute capabilities of the GPUs torch sees, e.g. ["9.0"]."""
    import torch

    if not torch.cuda.is_available():
        raise KernelBuildError("torch sees no CUDA GPU here: give the architecture to build for, e.g. "
                               "`--arch 9.0` (H100; `make kernels ARCH=9.0`)")
    return sorted({"{}.{}".format(*torch.cuda.get_device_capability(index))
                   for index in range(torch.cuda.device_count())})


def check_nvcc(archs: list[str]) -> Path:
    """The CUDA toolkit torch's extension builder will use; its nvcc must match torch's CUDA major and know
    every architecture asked for."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        raise KernelBuildError(f"torch {torch.__version__} is not a CUDA build: install torch's CUDA wheel first "
                               "(docs/environment.md)")
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        raise KernelBuildError(
            f"no nvcc found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda). Install the CUDA {torch.version.cuda} "
            "toolkit, or nvcc from PyPI beside torch's CUDA libraries (the cuda-toolkit version torch requires, "
            "with its nvcc extra) and set CUDA_HOME to <site-packages>/nvidia/cu13 (docs/environment.md)")
    nvcc = Path(CUDA_HOME) / "bin" / "nvcc"
    # torch takes CUDA_HOME from the nvcc on PATH when it is not set: a wrapper in /usr/local/bin gives
    # /usr/local, which has no CUDA headers.
    if not (Path(CUDA_HOME) / "include" / "cuda_runtime.h").exists():
        raise KernelBuildError(f"CUDA_HOME {CUDA_HOME} (the variable, or taken from the nvcc on PATH) has no "
                               "include/cuda_runtime.h: set CUDA_HOME to the toolkit's folder, e.g. /usr/local/cuda")
    version = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                 text=True, check=True).stdout)
    if version is None or version.group(1) != torch.version.cuda.split(".")[0]:
        raise KernelBuildError(f"{nvcc} is CUDA {version and version.group(0)}, torch {torch.__version__} was "
                               f"built with CUDA {torch.version.cuda}: their major versions must match")
    known = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout.split()
    unknown = [arch for arch in archs if f"compute_{arch.replace('.', '')}" not in known]
    if unknown:
        raise KernelBuildError(f"{nvcc} cannot compile for {', '.join(unknown)}; it knows {' '.join(known)}")
    return nvcc


def check_host_compiler() -> str:
    """The C++ compiler nvcc will call: $CC when set (torch passes it to nvcc as -ccbin; conda's compiler
    packages set it), else gcc. nvcc refuses a gcc newer than NEWEST_GCC."""
    compiler = os.environ.get("CC", "gcc")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C compiler {compiler!r} (from CC, else gcc): install gcc (Debian: build-essential)")
    banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    if "clang" not in banner:
        major = int(subprocess.run([compiler, "-dumpversion"], capture_output=True, text=True,
                                   check=True).stdout.split(".")[0])
        if major > NEWEST_GCC:
            raise KernelBuildError(f"{compiler} is gcc {major}; nvcc accepts gcc up to {NEWEST_GCC}: set CC and CXX "
                                   "to an older gcc (e.g. CC=gcc-13 CXX=g++-13), or outside a conda environment "
                                   "whose compiler packages set them")
    return banner.splitlines()[0]


def parallel_jobs(cpus: int, available_bytes: int) -> int:
    """MAX_JOBS: as many compile jobs as CPUs, but no more than the available memory holds."""
    return max(1, min(cpus, available_bytes // (GIB_PER_JOB * 2**30)))


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KernelBuildError("/proc/meminfo has no MemAvailable line: give --jobs")


def pip(*arguments: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *arguments], check=True, env=env)


def download_sdist(version: str, folder: Path) -> Path:
    # pip reads the package's metadata by running its setup.py here: SKIP_CUDA_BUILD keeps that from
    # looking for nvcc, FORCE_BUILD from looking for a prebuilt wheel on GitHub.
    env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", MAMBA_FORCE_BUILD="TRUE")
    pip("download", "--no-deps", "--no-binary", PACKAGE, "--no-build-isolation", "--dest", str(folder),
        f"{PACKAGE}=={version}", env=env)
    return folder / f"mamba_ssm-{version}.tar.gz"


def build(archs: list[str], jobs: int, sdist: Path | None, wheel_dir: Path, install: bool) -> Path:
    """Build the wheel into ``wheel_dir``, install it when ``install``; the wheel's path."""
    constraints = REPO / "constraints.txt"
    version = pinned_version(constraints)
    # setup.py imports wheel, ninja runs the parallel compile; einops and transformers are imported by mamba_ssm.
    pip("install", "--constraint", str(constraints), *companion_requirements(REPO / "pyproject.toml"))
    with tempfile.TemporaryDirectory(prefix="mamba-ssm-build-") as scratch:
        scratch = Path(scratch)
        sdist = sdist or download_sdist(version, scratch)
        with tarfile.open(sdist) as archive:
            archive.extractall(scratch, filter="data")
        source = scratch / f"mamba_ssm-{version}"
        if not (source / "setup.py").is_file():
            raise KernelBuildError(f"{sdist} holds no mamba_ssm-{version}/setup.py: is it mamba-ssm {version}'s "
                                   "source distribution?")
        setup = source / "setup.py"
        setup.write_text(patch_setup(setup.read_text(), archs))
        # MAMBA_KEEP_CUDA_BUILD: newer mamba-ssm releases build the extension only with it.
        env = dict(os.environ, MAMBA_FORCE_BUILD="TRUE", MAMBA_KEEP_CUDA_BUILD="TRUE", MAX_JOBS=str(jobs),
                   TORCH_CUDA_ARCH_LIST=";".join(archs))
        pip("wheel", "--no-build-isolation", "--no-deps", "--wheel-dir", str(scratch / "dist"), str(source), env=env)
        (built,) = (scratch / "dist").glob("mamba_ssm-*.whl")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheel = Path(shutil.move(built, wheel_dir / built.name))
    if install:
        pip("install", "--no-deps", "--force-reinstall", str(wheel))
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pathmamba.operations.kernels", description=__doc__.split("\n")[0])
    # `make kernels ARCH=... JOBS=...` passes them through the environment (never through a shell's command
    # line): PATHMAMBA_KERNEL_ARCH (space-separated) and PATHMAMBA_KERNEL_JOBS.
    parser.add_argument("--arch", action="append", help="compute capability to build for, e.g. 9.0 (repeatable); default: this machine's GPUs")
    parser.add_argument("--jobs", default=os.environ.get("PATHMAMBA_KERNEL_JOBS") or None,
                        help=f"parallel compile jobs (MAX_JOBS); default: the CPUs, at most one per {GIB_PER_JOB} "
                             "GiB of available memory")
    parser.add_argument("--sdist", type=Path, help="mamba-ssm's source distribution (.tar.gz) instead of "
                                                   "downloading it")
    parser.add_argument("--wheel-dir", type=Path, default=REPO / "build" / "kernels",
                        help="where the built wheel is kept (default: build/kernels)")
    parser.add_argument("--no-install", dest="install", action="store_false",
                        help="build the wheel only (install it elsewhere with pip install --no-deps)")
    args = parser.parse_args(argv)
    try:
        if args.jobs is not None and not (args.jobs.isdigit() and int(args.jobs) >= 1):
            raise KernelBuildError(f"--jobs (make: JOBS) {args.jobs!r}: expected a whole number of 1 or more")
        if args.sdist is not None and not args.sdist.is_file():
            raise KernelBuildError(f"--sdist {args.sdist}: no such file")
        archs = sorted(set(args.arch or os.environ.get("PATHMAMBA_KERNEL_ARCH", "").split())) or detected_archs()
        gencode_flags(archs)
        nvcc = check_nvcc(archs)
        compiler = check_host_compiler()
        jobs = int(args.jobs) if args.jobs else parallel_jobs(os.cpu_count() or 1, available_memory())
        print(f"building {PACKAGE}'s selective_scan_cuda for compute capability {', '.join(archs)} with {nvcc}, "
              f"host compiler {compiler}, MAX_JOBS={jobs}", flush=True)
        wheel = build(archs, jobs, args.sdist, args.wheel_dir, args.install)
    except KernelBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(map(str, error.cmd))} exited with {error.returncode} (its output is above)",
              file=sys.stderr)
        return 1
    print(f"{'installed' if args.install else 'built'} {wheel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
