"""``python -m pathmamba doctor``: is this machine ready to run a workflow config's grid?

One table of checks, each OK, FAIL or n/a (not applicable here, e.g. GPU rows of a CPU config), with
what was found and, for a FAIL, what to do. The exit status is 1 when any check fails. Nothing is
written; the only work done is building each model once on the CPU (to size the results on disk)
and, on CUDA, one random scan through both selective-scan implementations.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pathmamba.core.devices import cuda_unavailable_reason
from pathmamba.core.gpus import gpu_pool, nvidia_driver
from pathmamba.core.layout import VALIDATION_REPORT, configured_experiment_dir
from pathmamba.engine.config import (
    ConfigError,
    all_fetched_weights,
    check_config,
    grid_datasets,
    grid_methods,
    method_hparams,
    train_settings,
    without_weights_files,
)
from pathmamba.engine.registry import build_method, training_stages
from pathmamba.models.scan import compare_fused_with_fallback, fused_scan_unavailable_reason
from pathmamba.operations.plan import gpu_jobs, runtime_minutes

OK, FAIL, NOT_APPLICABLE = "OK", "FAIL", "n/a"
#: pyproject.toml's requires-python (tests/test_device.py keeps them equal).
MINIMUM_PYTHON = (3, 11)
#: Largest relative difference between the fused and the PyTorch scan (output and every gradient,
#: :func:`pathmamba.models.scan.compare_fused_with_fallback`) that passes: both read bf16 inputs and
#: return bf16, so agreeing scans differ by bf16 rounding (a few 1e-3); different computations by ~1.
FUSED_TOLERANCE = 1e-2
#: A training job's checkpoints at their largest, in model sizes: last.pt and previous.pt (weights and
#: Adam's two moments each) and the best weights.
CHECKPOINT_MODEL_SIZES = 7
#: Bytes of one pseudo-mask PNG (a 224 px palette image; measured on the synthetic data: 0.5-1.5 kB).
PSEUDO_MASK_BYTES = 2048
#: Attempts of a job under workflow/profiles/slurm (`retries: 2`), each asking a longer time limit.
SLURM_ATTEMPTS = 3


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def _uses_cuda(config: dict[str, Any]) -> bool:
    """Whether the config's jobs ask for a GPU (``cuda`` or ``auto``) anywhere."""
    devices = {train_settings(config, method, stage).get("device", "auto") for method in grid_methods(config)
               for stage in training_stages(method)}
    return any(device != "cpu" for device in devices)


def _requires_cuda(config: dict[str, Any]) -> bool:
    return any(train_settings(config, method).get("device", "auto").startswith("cuda") for method in grid_methods(config))


def missing_gpu_indices(config: dict[str, Any], count: int) -> list[str]:
    """One line per ``train.device`` (global, a method's or a first stage's) of the form ``cuda:N`` naming a
    GPU index that this machine, with ``count`` visible GPUs, lacks."""
    blocks = [("train", config.get("train", {}))]
    for method, entry in config.get("methods", {}).items():
        blocks += [(f"methods.{method}.train", (entry or {}).get("train", {})),
                   (f"methods.{method}.stage1.train", ((entry or {}).get("stage1") or {}).get("train", {}))]
    lines = []
    for key, block in blocks:
        device = str(block.get("device", ""))
        if device.startswith("cuda:") and int(device.partition(":")[2]) >= count:
            lines.append(f"{key}.device: {device!r}, but this machine shows {count} GPU(s) "
                         f"(cuda:0..cuda:{count - 1}); give an index below {count}, or 'cuda'")
    return lines


def check_python() -> Check:
    version = platform.python_version()
    needed = ".".join(map(str, MINIMUM_PYTHON))
    return Check("Python", OK if sys.version_info >= MINIMUM_PYTHON else FAIL, f"{version} (needs >= {needed})")


def check_torch() -> Check:
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    return Check("torch", OK, f"{torch.__version__}, {build}")


def check_gpus(config: dict[str, Any]) -> list[Check]:
    """Driver, GPUs with their memory, bf16: FAIL when the config needs CUDA and it is not usable."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        if _requires_cuda(config):
            return [Check("CUDA device", FAIL, f"the config sets device 'cuda', but {reason}; set train.device "
                                               "to 'cpu' to run here")]
        return [Check("CUDA device", NOT_APPLICABLE, f"no usable GPU ({reason}); the config runs on the CPU")]
    driver = nvidia_driver()
    names = [f"cuda:{i} {torch.cuda.get_device_name(i)} "
             f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
             for i in range(torch.cuda.device_count())]
    pool = gpu_pool(config.get("gpus", "auto"))
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    needs_bf16 = any(train_settings(config, m).get("precision", "auto") in ("auto", "bf16") for m in grid_methods(config))
    missing = missing_gpu_indices(config, torch.cuda.device_count())
    return [Check("NVIDIA driver", OK if driver else FAIL,
                  f"{driver} for CUDA {torch.version.cuda}" if driver else "nvidia-smi not found or not working"),
            Check("GPUs", FAIL if missing else OK,
                  "; ".join(missing or names) + f"; a local run spreads GPU jobs over {len(pool)}: {','.join(pool)}"),
            Check("bf16", OK if bf16 or not needs_bf16 else FAIL,
                  "supported" if bf16 else "not supported by this GPU; set train.precision to 'fp32'")]


def check_fused_scan(config: dict[str, Any]) -> Check:
    """The fused kernel importable and equal to the PyTorch scan on a random input (CUDA only)."""
    wanted = {train_settings(config, method).get("scan", "auto") for method in grid_methods(config)}
    if cuda_unavailable_reason() is not None:
        status = FAIL if "fused" in wanted else NOT_APPLICABLE
        return Check("fused selective scan", status, "needs CUDA" + ("; the config sets scan 'fused'" if status == FAIL
                                                                     else ""))
    if wanted == {"pytorch"}:
        return Check("fused selective scan", NOT_APPLICABLE, "the config sets scan 'pytorch'")
    reason = fused_scan_unavailable_reason()
    if reason is not None:
        return Check("fused selective scan", FAIL, f"{reason}; build it with `make kernels` (docs/environment.md) or "
                                                   "set train.scan to 'pytorch' (much slower)")
    errors = compare_fused_with_fallback(torch.device("cuda"))
    worst = max(errors.values())
    return Check("fused selective scan", OK if worst <= FUSED_TOLERANCE else FAIL,
                 f"mamba_ssm {metadata.version('mamba-ssm')}; largest relative difference to the PyTorch scan {worst:.2e} "
                 f"(tolerance {FUSED_TOLERANCE:g}) over {', '.join(errors)}")


def check_weights(config: dict[str, Any]) -> Check:
    files = all_fetched_weights(config)
    if not files:
        return Check("pretrained weights", NOT_APPLICABLE, "no method loads a weights file")
    missing = [path for path in files if not Path(path).is_file()]
    if missing:
        return Check("pretrained weights", FAIL, f"missing: {', '.join(missing)}; the workflow's fetch_weights "
                                                 "rule downloads them (needs internet on this host), or copy them")
    return Check("pretrained weights", OK, f"{len(files)} present: {', '.join(files)}")


def check_datasets(config: dict[str, Any]) -> list[Check]:
    """Each dataset validated by the workflow (its validation report says ok); synthetic ones not yet
    generated are n/a (the workflow makes them)."""
    checks = []
    for name in grid_datasets(config):
        entry = config["datasets"][name]
        experiment_dir = configured_experiment_dir(config["results_dir"], config["experiment"])
        report = experiment_dir / VALIDATION_REPORT.format(dataset=name)
        label = f"dataset {name}"
        if report.is_file():
            record = json.loads(report.read_text())
            status = OK if record.get("ok") else FAIL
            checks.append(Check(label, status, f"{'valid' if status == OK else 'INVALID'} ({report}): "
                                               + ", ".join(f"{k} {v}" for k, v in record.get("counts", {}).items())))
        elif "synthetic" in entry:
            checks.append(Check(label, NOT_APPLICABLE, "synthetic: the workflow generates and validates it"))
        else:
            checks.append(Check(label, FAIL, f"not validated yet (no {report}); `snakemake --until "
                                             "validate_dataset` prepares and validates it, then run doctor again"))
    return checks


def _model_bytes(config: dict[str, Any], method: str, stage: int | None) -> int:
    """Bytes of the method's float32 weights, built with random weights (the size does not depend on them)."""
    model = build_method(method, num_classes=4, stage=stage,
                         **without_weights_files(method_hparams(config, method, stage)))
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


def grid_disk_bytes(config: dict[str, Any], concurrent_jobs: int) -> dict[str, int]:
    """What the grid writes at most: model files of every run and stage, pseudo masks, and the
    checkpoints of ``concurrent_jobs`` training jobs at once (the largest model's)."""
    from pathmamba.operations.plan import dataset_counts

    seeds, datasets = len(config["seeds"]), grid_datasets(config)
    models, pseudo, largest = 0, 0, 0
    for method in grid_methods(config):
        stages = training_stages(method)
        for stage in stages:
            size = _model_bytes(config, method, stage)
            largest = max(largest, size)
            models += size * seeds * len(datasets)
        if len(stages) == 2:
            pseudo += sum(dataset_counts(config, name)["training"] for name in datasets) * seeds * 3 * PSEUDO_MASK_BYTES
    return {"model files": models, "pseudo masks": pseudo,
            "checkpoints": largest * CHECKPOINT_MODEL_SIZES * concurrent_jobs}


def check_disk(config: dict[str, Any]) -> Check:
    concurrent = max(1, len(gpu_pool(config.get("gpus", "auto"))))
    needed = grid_disk_bytes(config, concurrent)
    folder = Path(config["results_dir"]).resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    total = sum(needed.values())
    parts = ", ".join(f"{name} {value / 2**30:.1f}" for name, value in needed.items())
    return Check("free disk", OK if free >= total else FAIL,
                 f"{free / 2**30:.1f} GiB free at {folder}; the grid writes up to {total / 2**30:.1f} GiB ({parts}), "
                 "datasets not counted")


def check_slurm_plugin() -> Check:
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None:
        return Check("SLURM executor plugin", OK, f"snakemake-executor-plugin-slurm "
                                                  f"{metadata.version('snakemake-executor-plugin-slurm')}")
    if shutil.which("sbatch") is not None:
        return Check("SLURM executor plugin", FAIL, "sbatch is here but the plugin is not: pip install "
                                                    "snakemake-executor-plugin-slurm (environment.yml has it)")
    return Check("SLURM executor plugin", NOT_APPLICABLE, "not installed; no sbatch here (not a SLURM host)")


def slurm_minutes(limit: str) -> float | None:
    """Minutes of a SLURM time limit as sinfo prints it (`minutes`, `minutes:seconds`,
    `hours:minutes:seconds`, `days-hours[:minutes[:seconds]]`); None for `infinite`."""
    if limit.lower() in ("infinite", "unlimited"):
        return None
    days, dash, clock = limit.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if dash or len(parts) == 3:
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        hours, (minutes, seconds) = 0, [*parts, 0][:2]
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def partition_time_limits() -> tuple[dict[str, float | None], str | None]:
    """({partition: its time limit in minutes, None if unlimited}, the default partition) from sinfo."""
    listed = subprocess.run(["sinfo", "--noheader", "--format=%P %l"], capture_output=True, text=True, check=True,
                            timeout=60).stdout
    limits, default = {}, None
    for line in listed.splitlines():
        name, limit = line.split()
        if name.endswith("*"):
            name = default = name.removesuffix("*")
        limits[name] = slurm_minutes(limit)
    return limits, default


def check_slurm_time_limits(config: dict[str, Any]) -> Check:
    """The GPU jobs' estimates and the time limits their attempts ask for, against the time limit of the
    GPU partition (`slurm.gpu_partition`, else the cluster's default): SLURM refuses or holds for ever a
    job asking more than its partition allows."""
    name = "SLURM time limits"
    if shutil.which("sinfo") is None:
        return Check(name, NOT_APPLICABLE, "no sinfo here (not a SLURM host)")
    try:
        limits, default = partition_time_limits()
    except (OSError, subprocess.SubprocessError) as error:
        # A workstation may have SLURM's client tools without a cluster behind them (the doctor's other
        # rows still apply); on a login node the submission itself would fail on the same error.
        reason = str(getattr(error, "stderr", None) or error).strip()
        return Check(name, NOT_APPLICABLE, f"sinfo reaches no SLURM controller ({reason}): time limits not checked")
    partition = config["slurm"]["gpu_partition"] or default
    if partition not in limits:
        return Check(name, FAIL, f"GPU partition {partition!r} (slurm.gpu_partition, else the default) is not "
                                 f"one that sinfo lists: {', '.join(limits)}; set slurm.gpu_partition")
    try:
        jobs = gpu_jobs(config)
    except ConfigError as error:
        return Check(name, FAIL, str(error).replace("\n", " "))
    if not jobs:
        return Check(name, NOT_APPLICABLE, "the grid has no GPU jobs")
    cap = config["slurm"]["max_runtime_hours"]
    longest = max(jobs, key=lambda job: job.gpu_hours)
    asked = [runtime_minutes(longest.gpu_hours, attempt, cap) for attempt in range(1, SLURM_ATTEMPTS + 1)]
    limit = limits[partition]
    detail = (f"partition {partition}: {'no limit' if limit is None else f'{limit / 60:g} h'}; longest job "
              f"{longest.rule} {longest.dataset} {longest.method}: estimate {longest.gpu_hours:.1f} h, time limits "
              f"{' / '.join(f'{minutes / 60:.1f}' for minutes in asked)} h at attempts 1-{SLURM_ATTEMPTS} "
              f"(slurm.max_runtime_hours {cap:g})")
    if limit is None:
        return Check(name, OK, detail)
    over = [job for job in jobs if job.gpu_hours * 60 > limit]
    if over:
        return Check(name, FAIL, f"{len(over)} of {len(jobs)} GPU jobs are estimated above the partition's limit; "
                                 f"{detail}. Use a partition with a longer limit (slurm.gpu_partition)")
    if max(asked) > limit:
        return Check(name, FAIL, f"{detail}: above the partition's limit; set slurm.max_runtime_hours to at most "
                                 f"{limit / 60:g}")
    return Check(name, OK, detail)


def check_config_values(config: dict[str, Any]) -> Check:
    """The Snakefile's start-up check (:func:`pathmamba.engine.config.check_config`): FAIL with its problems."""
    try:
        check_config(config)
    except ConfigError as error:
        return Check("config", FAIL, str(error).replace("\n", " "))
    return Check("config", OK, "methods, datasets and presets as the Snakefile checks them")


def run_checks(config: dict[str, Any]) -> list[Check]:
    """Every check; the disk is sized by building each model, so only once the config passes its check."""
    config_check = check_config_values(config)
    disk = (check_disk(config) if config_check.status == OK
            else Check("free disk", NOT_APPLICABLE, "not sized: the models are built from a valid config only "
                                                     "(see the config row)"))
    time_limits = (check_slurm_time_limits(config) if config_check.status == OK
                   else Check("SLURM time limits", NOT_APPLICABLE, "not estimated: the config does not pass its "
                                                                   "check (see the config row)"))
    return [config_check, check_python(), check_torch(), *check_gpus(config), check_fused_scan(config),
            check_weights(config), *check_datasets(config), disk, check_slurm_plugin(), time_limits]


def format_checks(checks: list[Check]) -> str:
    lines = ["| check | status | detail |", "|---|---|---|"]
    lines += [f"| {check.name} | {check.status} | {check.detail} |" for check in checks]
    failed = sum(check.status == FAIL for check in checks)
    lines.append("")
    lines.append(f"{failed} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed or n/a")
    return "\n".join(lines)
