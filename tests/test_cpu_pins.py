"""The CPU pins (pathmamba/core/cpu_pins.py): what each mode sets, takes back and records."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from pathmamba.core import cpu_pins


@pytest.fixture
def restored_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    cpu_pins.apply(saved.get(cpu_pins.MODE_VARIABLE))


def test_importing_the_package_pins_a_fresh_process_before_torch_loads():
    env = {name: value for name, value in os.environ.items()
           if name not in cpu_pins.AVX2_PINS and name != cpu_pins.MODE_VARIABLE}
    code = ("import pathmamba, torch, numpy\nfrom numpy._core._multiarray_umath import __cpu_features__ as f\n"
            "from pathmamba.core.cpu_pins import record\nr = record()\n"
            "print(r['capability'], r['pinned_isa'], f['X86_V4'])")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                            check=True)
    # numpy's AVX-512 loops are off whatever this CPU has.
    assert result.stdout.split() == ["AVX2", "avx2", "False"]


def test_native_takes_back_the_pins_this_process_set_and_keeps_the_users(restored_environment):
    cpu_pins.apply("avx2")
    os.environ["MKL_CBWR"] = "AVX2"  # the user's own, set after the pins
    assert cpu_pins.apply("native") == {}
    assert os.environ["MKL_CBWR"] == "AVX2"
    assert all(name not in os.environ for name in cpu_pins.AVX2_PINS if name != "MKL_CBWR")
    assert os.environ[cpu_pins.MODE_VARIABLE] == "native"
    assert cpu_pins.apply("avx2") == cpu_pins.AVX2_PINS
    assert {name: os.environ[name] for name in cpu_pins.AVX2_PINS} == cpu_pins.AVX2_PINS


def test_native_after_the_import_time_pins_restores_what_the_user_had_set(restored_environment):
    """The workflow's case: the user exports a variable, importing pathmamba pins over it, then the
    config's `cpu_pins: native` takes the pins back: the user's value is in effect again."""
    cpu_pins.apply("native")
    os.environ["ATEN_CPU_CAPABILITY"] = "default"
    os.environ.pop("MKL_CBWR", None)
    cpu_pins.apply("avx2")
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    cpu_pins.apply("native")
    assert os.environ["ATEN_CPU_CAPABILITY"] == "default" and "MKL_CBWR" not in os.environ


def test_an_unknown_mode_is_refused_naming_the_variable(restored_environment):
    os.environ[cpu_pins.MODE_VARIABLE] = "avx512"
    with pytest.raises(cpu_pins.PinError, match=r"PATHMAMBA_CPU_PINS='avx512': expected one of avx2, native"):
        cpu_pins.mode()


def test_the_record_says_pinned_only_when_every_pin_holds(restored_environment):
    cpu_pins.apply("avx2")
    pinned = cpu_pins.record()
    assert pinned["pins"] == cpu_pins.AVX2_PINS and pinned["pins_requested"] == "avx2"
    assert pinned["capability"] == "AVX2" and pinned["pinned_isa"] == "avx2"
    assert pinned["vendor"] in ("GenuineIntel", "AuthenticAMD") and "avx2" in pinned["isa_flags"]
    assert "pinned to AVX2" in cpu_pins.describe(pinned)
    os.environ["ATEN_CPU_CAPABILITY"] = "default"  # one library off its pin: not pinned
    unpinned = cpu_pins.record()
    assert unpinned["pinned_isa"] is None and "not pinned (avx2)" in cpu_pins.describe(unpinned)
