"""The CPU instruction-set pins: the same float results on every x86-64 machine with AVX2.

Why: the CPU libraries under torch and numpy pick their code paths from the machine they run on (the
instruction set, the vendor, the cache sizes), and the paths round differently. One last bit of one
kernel is enough to change which epoch a short training run selects, so a result computed on an Intel
AVX-512 machine was not what an AMD AVX2 machine computed. Pinned, each library takes one path that every
x86-64 CPU with AVX2 has (Intel since Haswell, 2013; AMD since Excavator and every Zen):

============================  =====================  ===============================================
variable                      pinned value           library, and why this value
============================  =====================  ===============================================
``ATEN_CPU_CAPABILITY``       ``avx2``               ATen's vectorised kernels (AVX-512 paths off)
``ONEDNN_MAX_CPU_ISA``        ``AVX2``               oneDNN (convolutions): no AVX-512/AMX kernels
``MKL_CBWR``                  ``COMPATIBLE,STRICT``  MKL (matmul, and torch's exp/log/tanh/erf...):
                                                     MKL picks a path by CPU *vendor*; only its
                                                     COMPATIBLE branch is the same on Intel and AMD
                                                     (measured: the AVX2 branch's matmul and exp
                                                     differ); STRICT: independent of alignment
``OPENBLAS_CORETYPE``         ``Haswell``            OpenBLAS under numpy/scipy (scikit-learn's
                                                     k-means in SC-CAM): one kernel set
``NPY_DISABLE_CPU_FEATURES``  ``X86_V4 AVX512_ICL    numpy's own dispatched loops: AVX-512 ones off
                              AVX512_SPR``
============================  =====================  ===============================================

Two more choices complete it, made in code: torch's Adam runs ``fused`` (its unfused CPU update takes
``sqrt`` from MKL's vector math, whose last bit still differs between vendors under COMPATIBLE; the fused
kernel uses the exactly rounded square-root instruction), and the thread count is the config's
``threads_per_job`` (reductions split by thread). How this was measured, and what is guaranteed:
docs/reproducibility.md.

The variables are read when each library loads, so they are set on import of this package (see
``pathmamba/__init__.py``), before torch or numpy is imported, in every process: fresh jobs, the fork
server, the tests. ``PATHMAMBA_CPU_PINS`` chooses: ``avx2`` (the default; overrides the variables above)
or ``native`` (leaves the environment as it is: the fastest paths of this machine, its own last bits).
Imports nothing heavy.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable that chooses the pins; the workflow sets it from the config's ``cpu_pins``.
MODE_VARIABLE = "PATHMAMBA_CPU_PINS"
MODES = ("avx2", "native")
DEFAULT_MODE = "avx2"

#: What ``avx2`` sets (see the module docstring for each).
AVX2_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "OPENBLAS_CORETYPE": "Haswell",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}

#: The CPU flags (of /proc/cpuinfo) that decide which path a library takes: recorded with every result.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_bf16")

#: The variables apply() set in this process: name -> (the value it set, the value before, or None).
_applied: dict[str, tuple[str, str | None]] = {}


class PinError(ValueError):
    """An unknown ``PATHMAMBA_CPU_PINS`` value."""


def mode() -> str:
    """The pins asked for by ``PATHMAMBA_CPU_PINS`` (default ``avx2``)."""
    value = os.environ.get(MODE_VARIABLE, DEFAULT_MODE)
    if value not in MODES:
        raise PinError(f"{MODE_VARIABLE}={value!r}: expected one of {', '.join(MODES)}")
    return value


def apply(requested: str | None = None) -> dict[str, str]:
    """Set the pins of ``requested`` (default: :func:`mode`) in ``os.environ``, and ``PATHMAMBA_CPU_PINS``
    to it so that child processes do the same; the pins set. ``native`` sets none and takes back those an
    earlier call in this process set (the workflow imports this package before it reads the config),
    restoring what the user had set before them."""
    chosen = requested or mode()
    if chosen not in MODES:
        raise PinError(f"CPU pins {chosen!r}: expected one of {', '.join(MODES)}")
    for name, (ours, before) in _applied.items():
        if os.environ.get(name) == ours:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    _applied.clear()
    os.environ[MODE_VARIABLE] = chosen
    pins = AVX2_PINS if chosen == "avx2" else {}
    for name, value in pins.items():
        _applied[name] = (value, os.environ.get(name))
        os.environ[name] = value
    return dict(pins)


def child_environment(requested: str) -> dict[str, str]:
    """This process's environment for a child that runs with the pins ``requested``, without the pins this
    package set here (so that ``native`` there means the libraries' own defaults)."""
    env = {name: value for name, value in os.environ.items() if name not in AVX2_PINS}
    env[MODE_VARIABLE] = requested
    return env


def _cpuinfo() -> tuple[str | None, str | None, list[str]]:
    """(model name, vendor, the ISA_FLAGS this CPU has) from /proc/cpuinfo; Nones on other systems."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None, None, []
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return fields.get("model name"), fields.get("vendor_id"), [flag for flag in ISA_FLAGS if flag in flags]


def record() -> dict:
    """What decided this process's CPU float results: the CPU (model, vendor, ISA flags), the pins asked
    for, the variables in effect, the ATen kernels torch actually runs (``capability``: AVX2 when
    pinned on any AVX2 CPU) and whether the pins hold (``pinned``: asked for, every variable at its pin
    and ATen at AVX2; false on a CPU without AVX2, where torch falls back to slower, other kernels)."""
    import torch

    model, vendor, flags = _cpuinfo()
    asked = os.environ.get(MODE_VARIABLE, DEFAULT_MODE)
    in_effect = {name: os.environ.get(name) for name in AVX2_PINS}
    capability = torch.backends.cpu.get_cpu_capability()
    pinned = asked == "avx2" and in_effect == AVX2_PINS and capability == "AVX2"
    return {"model": model, "vendor": vendor, "isa_flags": flags, "pins_requested": asked,
            "pins": in_effect, "capability": capability, "pinned_isa": "avx2" if pinned else None}


def describe(cpu: dict) -> str:
    """One line of :func:`record` for a log's first line."""
    pins = "pinned to AVX2 (bitwise across x86-64 CPUs)" if cpu["pinned_isa"] else f"not pinned ({cpu['pins_requested']})"
    return f"CPU {cpu['model'] or 'unknown'} | kernels {cpu['capability']}, {pins}"

