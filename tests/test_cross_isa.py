"""With the CPU pins (pathmamba/core/cpu_pins.py), results do not depend on the CPU's instruction set or vendor.

Shown on one machine: the same commands (demo data, then one training epoch and the test evaluation of
every baseline family and of PathMamba with all its components) run natively and under QEMU's user-mode
emulation of two CPUs without AVX-512: an Intel Haswell (AVX2, GenuineIntel) and an AMD EPYC of the first
Zen generation (AVX2, AuthenticAMD). Emulated, every library sees that CPU's CPUID (its instruction set,
vendor and cache sizes) and takes the code paths it would take there. On this project's machines the
native CPU has AVX-512, so one run covers AVX-512 vs AVX2 and Intel vs AMD. The data, the trained weights,
the test metrics, the per-image scores and the predicted masks must be byte-identical; unpinned they are
not (the last test). docs/reproducibility.md has the measurements behind each pin.

Slow (QEMU runs the CPU code about 30 times slower): marked ``qemu``; skipped without ``qemu-x86_64``
unless PATHMAMBA_REQUIRE_QEMU=1 (CI: .ci/run installs Debian's qemu-user), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from pathmamba.core import cpu_pins

pytestmark = pytest.mark.qemu

QEMU = shutil.which("qemu-x86_64")
if QEMU is None:
    if os.environ.get("PATHMAMBA_REQUIRE_QEMU") == "1":
        raise RuntimeError("qemu-x86_64 is not installed (apt-get install qemu-user), and PATHMAMBA_REQUIRE_QEMU=1")
    pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user)", allow_module_level=True)

#: QEMU's CPU models without AVX-512 (TCG emulates up to AVX2), one of each vendor.
EMULATED_CPUS = ("Haswell", "EPYC")
DATASET = "synthetic-luad"
DATA = {"n_train": 16, "n_val": 4, "n_test": 4, "size": 32, "seed": 0}
SETTINGS = {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "device": "cpu", "workers": 0}
#: Every family: ResNet CAMs (with Grad-CAM and HistoSegNet's dense CRF in evaluation), SC-CAM's k-means
#: (OpenBLAS), C-CAM, the UNet (timm and segmentation-models-pytorch), the two-stage WSSS-Tissue
#: (pseudo masks, DeepLabV3+) and PathMamba (MIML, CMB, the selective scan).
METHODS = ("cam", "histosegnet", "sc-cam", "c-cam", "unet", "wsss-tissue", "pathmamba")


def _demo_methods() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["methods"]


def _commands(out: Path, methods: tuple[str, ...]) -> list[list[str]]:
    """The CLI calls of one run of ``methods`` into ``out``, in order."""
    data = out / "data"
    calls = [["make-demo-data", "--dataset", DATASET, "--out", str(data),
              *[arg for key, value in DATA.items() for arg in (f"--{key.replace('_', '-')}", str(value))]]]
    demo = _demo_methods()
    for method in methods:
        entry = demo[method]
        run, checkpoints = out / method, out / f"{method}-checkpoints"
        common = ["--method", method, "--dataset", DATASET, "--data-root", str(data), "--seed", "0",
                  "--settings", json.dumps(SETTINGS), "--threads", "1", "--checkpoint-dir", str(checkpoints)]
        extra = []
        if "stage1" in entry:
            stage1 = out / f"{method}-stage1"
            calls.append(["train", *common, "--stage", "1", "--out", str(stage1),
                          "--hparams", json.dumps(entry["stage1"]["hparams"])])
            calls.append(["pseudo-masks", "--model", str(stage1 / "model.pt"), "--data-root", str(data),
                          "--out", str(out / f"{method}-pseudo"), "--device", "cpu", "--threads", "1"])
            extra = ["--stage1-model", str(stage1 / "model.pt"), "--pseudo-masks", str(out / f"{method}-pseudo")]
        calls.append(["train", *common, "--out", str(run), "--hparams", json.dumps(entry.get("hparams", {})), *extra])
        calls.append(["evaluate", "--model", str(run / "model.pt"), "--data-root", str(data), "--out", str(run),
                      "--masks-dir", str(run / "masks"), "--n-masks", "2", "--no-tta", "--device", "cpu",
                      "--threads", "1"])
    return calls


def _run(out: Path, cpu: str | None, pins: str, methods: tuple[str, ...] = METHODS) -> None:
    """Every call of :func:`_commands` in one Python process (one start-up under QEMU), natively or on
    the emulated ``cpu``, with the CPU pins ``pins``."""
    script = ("import json, sys\nfrom pathmamba.cli import main\n"
              "for argv in json.loads(sys.argv[1]):\n    assert main(argv) == 0, argv\n")
    prefix = [QEMU, "-cpu", cpu] if cpu else []
    # This process holds the default pins in its environment (conftest imports pathmamba); `native` leaves
    # the environment as it is, so the unpinned run gets one without them.
    env = {**cpu_pins.child_environment(pins), "PYTHONPATH": str(REPO)}
    result = subprocess.run([*prefix, sys.executable, "-c", script, json.dumps(_commands(out, methods))], env=env,
                            capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stderr[-4000:]


def _tensor_digest(path: Path) -> str:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode() + tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _digests(out: Path) -> dict[str, str]:
    """A digest of every result file under ``out``: the bytes of data, masks and per-image scores; the
    weights' tensors of model files (their metadata holds timings); test metrics and the pseudo masks'
    manifest without their environment record and paths. Logs, run.json and history.csv (timings, host) are left out."""
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        if path.name in ("run.json", "history.csv") or "checkpoints" in name:
            continue
        if path.suffix == ".pt":
            digests[name] = _tensor_digest(path)
        elif path.name in ("test_metrics.json", "manifest.json"):
            record = {key: value for key, value in json.loads(path.read_text()).items()
                      if key not in ("environment", "stage1_model")}
            digests[name] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        else:
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def native_pinned(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("native-avx2")
    _run(out, None, "avx2")
    return _digests(out)


@pytest.mark.parametrize("cpu", EMULATED_CPUS)
def test_pinned_results_are_bitwise_the_same_on_an_avx2_cpu_of_either_vendor(cpu, native_pinned, tmp_path):
    _run(tmp_path, cpu, "avx2")
    emulated = _digests(tmp_path)
    assert emulated.keys() == native_pinned.keys()
    assert any(name.endswith("model.pt") for name in emulated) and any("masks/" in name for name in emulated)
    differing = sorted(name for name in emulated if emulated[name] != native_pinned[name])
    assert differing == [], f"{cpu}: {len(differing)} of {len(emulated)} files differ from the native run"


def test_unpinned_results_differ_between_these_cpus(tmp_path):
    """The control: without the pins the same PathMamba training differs between the native CPU and the
    emulated Intel AVX2 one, so the test above can fail."""
    _run(tmp_path / "native", None, "native", ("pathmamba",))
    _run(tmp_path / "emulated", "Haswell", "native", ("pathmamba",))
    weights = "pathmamba/model.pt"
    assert _tensor_digest(tmp_path / "native" / weights) != _tensor_digest(tmp_path / "emulated" / weights)
