"""GPU planning: the GPU jobs of a workflow config and their estimated GPU-hours.

``snakemake -n`` counts jobs but not their cost. The cost of one job is estimated from the images it
processes and the method's throughput (images per second on one device), plus ``JOB_OVERHEAD_HOURS``:

    train hours        = epochs * (n_fit / train_images_per_s + n_select / eval_images_per_s) / 3600
    evaluate hours     = n_test / eval_images_per_s / 3600
    pseudo-mask hours  = n_train / pseudo_masks_images_per_s / 3600

A method trained on image labels or pseudo masks fits the training split and selects its model on val
(scored once per epoch); a pixel-supervised method (unet) fits part of val and selects on the rest
(``val_fraction``, as :func:`pathmamba.engine.train.split_for_pixel_supervision` splits it). A two-stage
method (wsss-tissue) has three jobs before its evaluation: its first stage (epochs of
``methods.<method>.stage1.train``), the pseudo masks and its second stage.

The throughput of each method comes from the measured throughput file (``python -m pathmamba
calibrate``; the config's ``throughput_file``, default ``<resources_dir>/throughput-<device
type>.json``) when that file was measured on the device type the config trains on (``train.device``;
``auto`` plans for CUDA) and holds the method at the job's batch size, image size and
hyper-parameters. Otherwise it comes from the config's ``throughput`` entry of the method, else it is
derived from the method's floor (the ``floor`` block: FLOPs and bytes per image counted from the
built model, in ``floor.costs_file``; the least time of that work on the GPU ``floor.gpu`` at its
peaks; times the efficiency of the method's model family), else it is the ``throughput.default``
entry (a first stage and its pseudo masks use the method's entry, the pseudo masks at its eval
speed). A ``throughput`` entry faster than the floor is an error: no GPU runs above its peaks. The same estimates size the SLURM ``runtime`` of the rules
(workflow/rules/train.smk, evaluate.smk), so this module must not import torch: the Snakefile imports
it at start-up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathmamba.core.layout import REPO, THROUGHPUT
from pathmamba.core.settings import TrainSettings
from pathmamba.data.readers import split_counts
from pathmamba.engine.config import (
    WEIGHT_KEYS,
    ConfigError,
    check_schema,
    configured_dataset_spec,
    grid_datasets,
    grid_methods,
    load_config_mapping,
    method_hparams,
    train_settings,
)
from pathmamba.engine.registry import PATHMAMBA_TARGET, get_spec, training_stages, two_stage_methods

# A GPU job's fixed cost beyond the images: start-up, imports, data indexing, checkpoint writes.
JOB_OVERHEAD_HOURS = 5 / 60
# SLURM runtime limit = estimate x margin (first attempt); retries multiply it by the attempt number, up
# to the config's `slurm.max_runtime_hours` (clusters refuse a job above their partition's time limit).
RUNTIME_MARGIN = 1.5
#: Patch side of the real datasets when the config does not say otherwise (``validate.image_size``).
REAL_IMAGE_SIZE = 224
SPEED_KEYS = ("train_images_per_s", "eval_images_per_s")
#: Adam's memory traffic per trainable parameter and step: it reads the weight, its gradient and both
#: moments and writes the weight and both moments, in float32.
ADAM_BYTES_PER_PARAMETER = 7 * 4


@dataclass(frozen=True)
class GpuJob:
    """One GPU job of the grid, its estimated cost in GPU-hours and where its throughput came from."""

    rule: str
    dataset: str
    method: str
    seed: int
    gpu_hours: float
    source: str


@dataclass(frozen=True)
class Throughput:
    """Images per second of one method (or its first stage) and where the numbers come from."""

    train_images_per_s: float
    eval_images_per_s: float
    pseudo_masks_images_per_s: float
    source: str


def load_workflow_config(path: Path) -> dict[str, Any]:
    """The config file at ``path`` checked against the workflow's schema, with its defaults filled in
    (as Snakemake does), so that the plan sees the values the workflow runs with; without Snakemake
    (:func:`pathmamba.engine.config.check_schema`)."""
    config = load_config_mapping(path)
    check_schema(config)
    return config


def dataset_counts(config: dict[str, Any], dataset: str) -> dict[str, int]:
    """Images per split of ``dataset``: the configured synthetic sizes, else the published counts, else
    (a user's dataset) the files in its configured folder."""
    entry = config["datasets"][dataset]
    if "synthetic" in entry:
        sizes = entry["synthetic"]
        return {"training": sizes["n_train"], "val": sizes["n_val"], "test": sizes["n_test"]}
    counts = configured_dataset_spec(config, dataset).counts
    if counts is None and "root" in entry:
        counts = split_counts(Path(entry["root"]), configured_dataset_spec(config, dataset))
    if counts is None:
        raise ConfigError(f"datasets.{dataset}: no published image counts to plan with; "
                          "give a 'synthetic' block or use a dataset with known counts")
    return counts


def largest_image_dataset(config: dict[str, Any]) -> str:
    """The grid's dataset with the largest images (the first of them): the size that ``calibrate`` measures
    and ``plan --floor`` counts at."""
    return max(grid_datasets(config), key=lambda name: dataset_image_size(config, name))


def dataset_image_size(config: dict[str, Any], dataset: str) -> int:
    """Patch side in pixels of ``dataset``: a synthetic dataset's ``size``, else ``validate.image_size``
    or :data:`REAL_IMAGE_SIZE`."""
    entry = config["datasets"][dataset]
    if "synthetic" in entry:
        return entry["synthetic"]["size"]
    return entry.get("validate", {}).get("image_size", REAL_IMAGE_SIZE)


def training_images(config: dict[str, Any], dataset: str, method: str,
                    stage: int | None = None) -> tuple[int, int]:
    """(images fitted, images scored for model selection) per epoch of ``method`` on ``dataset``."""
    counts = dataset_counts(config, dataset)
    if get_spec(method, stage).supervision != "pixel":
        return counts["training"], counts["val"]
    val_fraction = train_settings(config, method, stage).get("val_fraction", TrainSettings.val_fraction)
    # The sizes of pathmamba.engine.train.split_for_pixel_supervision (not imported: it needs torch).
    select = max(1, round(counts["val"] * val_fraction))
    return counts["val"] - select, select


def training_device_type(config: dict[str, Any]) -> str:
    """``cpu`` or ``cuda``: the device type the config trains on (``train.device``; ``auto`` is CUDA,
    the device a planned cluster run has)."""
    return "cpu" if config.get("train", {}).get("device", TrainSettings.device) == "cpu" else "cuda"


def default_throughput_path(config: dict[str, Any], device_type: str) -> Path:
    """``<resources_dir>/throughput-<device type>.json``: one file per device type, so that a CPU
    calibration (a laptop's demo run) never stands in for a GPU's, and beside the datasets and
    weights because it describes the hardware, not one run."""
    return Path(config.get("resources_dir", "resources")) / THROUGHPUT.format(device_type=device_type)


def throughput_path(config: dict[str, Any]) -> Path:
    """The measured throughput file the plan reads: ``throughput_file``, else the default one of the
    device type the config trains on."""
    if "throughput_file" in config:
        return Path(config["throughput_file"])
    return default_throughput_path(config, training_device_type(config))


def _positive(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _entry_problems(name: str, entry: Any, speed_keys: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"methods.{name} is {entry!r}, expected an object"]
    problems = [f"methods.{name}.{key} is {entry.get(key)!r}, expected a positive number of images per second"
                for key in speed_keys if not _positive(entry.get(key))]
    if not (isinstance(entry.get("batch_size"), int) and entry["batch_size"] > 0):
        problems.append(f"methods.{name}.batch_size is {entry.get('batch_size')!r}, "
                        "expected a positive integer")
    if not isinstance(entry.get("hparams"), dict):
        problems.append(f"methods.{name}.hparams is {entry.get('hparams')!r}, expected an object")
    return problems


def _throughput_file_problems(record: Any) -> list[str]:
    if not isinstance(record, dict):
        return [f"the file holds {type(record).__name__}, expected a JSON object"]
    problems = []
    if record.get("device_type") not in ("cpu", "cuda"):
        problems.append(f"device_type is {record.get('device_type')!r}, expected 'cpu' or 'cuda'")
    for key in ("device_name", "date"):
        if not isinstance(record.get(key), str):
            problems.append(f"{key} is {record.get(key)!r}, expected a string")
    settings = record.get("settings")
    image_size = settings.get("image_size") if isinstance(settings, dict) else None
    if not (isinstance(image_size, int) and image_size > 0):
        problems.append(f"settings.image_size is {image_size!r}, expected a positive integer")
    methods = record.get("methods")
    if not isinstance(methods, dict):
        return [*problems, f"methods is {methods!r}, expected an object"]
    for name, entry in methods.items():
        problems += _entry_problems(name, entry, SPEED_KEYS)
        if isinstance(entry, dict) and "stage1" in entry:
            problems += _entry_problems(f"{name}.stage1", entry["stage1"],
                                        (*SPEED_KEYS, "pseudo_masks_images_per_s"))
    return problems


def load_measured_throughput(path: Path) -> dict[str, Any] | None:
    """The throughput file at ``path`` (written by ``python -m pathmamba calibrate``), checked; None
    when there is no such file."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable throughput file ({error}); expected the JSON file written by "
                          "`python -m pathmamba calibrate`: rerun it, or delete the file to plan with the "
                          "config's assumed throughput") from None
    problems = _throughput_file_problems(record)
    if problems:
        raise ConfigError(f"{path}: not a throughput file as `python -m pathmamba calibrate` writes it: "
                          f"{'; '.join(problems)}; rerun calibrate, or delete the file to plan with the "
                          "config's assumed throughput")
    return record


def model_family(method: str) -> str:
    """``mamba`` (the PathMamba variants) or ``cnn`` (the baselines): the key of ``floor.efficiency``."""
    return "mamba" if get_spec(method).target == PATHMAMBA_TARGET else "cnn"


def floor_gpu(config: dict[str, Any]) -> dict[str, Any]:
    """The peaks of the GPU the floor is computed for: ``floor.gpus[floor.gpu]``."""
    floor = config["floor"]
    if floor["gpu"] not in floor["gpus"]:
        raise ConfigError(f"floor.gpu: {floor['gpu']!r} is not one of floor.gpus ({', '.join(floor['gpus'])})")
    return floor["gpus"][floor["gpu"]]


def costs_path(config: dict[str, Any]) -> Path:
    """``floor.costs_file``; a relative path is relative to the repository, beside the config files it
    goes with, wherever Snakemake runs (``--directory``)."""
    path = Path(config["floor"]["costs_file"])
    return path if path.is_absolute() else REPO / path


def load_costs(config: dict[str, Any]) -> dict[str, Any] | None:
    """The counted FLOPs and bytes of ``floor.costs_file`` (``python -m pathmamba plan --floor`` writes
    it); None without a ``floor`` block or without the file."""
    if "floor" not in config:
        return None
    path = costs_path(config)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        methods = record.get("methods") if isinstance(record, dict) else None
        if not isinstance(methods, dict):
            raise ValueError(f"'methods' is {methods!r}, expected an object")  # noqa: TRY004 - a bad file, not a bad call
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{path} (floor.costs_file): not a costs file as `python -m pathmamba plan --floor` "
                          f"writes it ({error}); delete it and run that command to count again") from None
    return record


def method_costs(config: dict[str, Any], dataset: str, method: str, stage: int | None = None) -> dict | None:
    """The counted work per image of ``method`` (``stage=1``: its first stage) when the costs file has it
    at ``dataset``'s image size and the method's hyper-parameters (weights files aside); else None."""
    record = load_costs(config)
    entry = (record or {}).get("methods", {}).get(method, {})
    entry = entry.get("stage1", {}) if stage == 1 else entry
    if (not entry or entry.get("image_size") != dataset_image_size(config, dataset)
            or _without_weights(entry.get("hparams", {})) != _without_weights(method_hparams(config, method, stage))):
        return None
    return entry


def seconds_per_image(work: dict[str, float], gpu: dict[str, Any], extra_bytes: float = 0.0) -> float:
    """The least time of one image's ``work`` on ``gpu``: its matrix products at the bf16 tensor peak or
    its memory traffic (plus ``extra_bytes``) at the memory bandwidth, whichever takes longer; then the
    selective scan's kernel: its exponentials at the special-function rate, its other FLOPs at the
    float32 peak or its traffic, whichever takes longest."""
    bandwidth = gpu["hbm_gb_s"] * 1e9
    tensor = max(work["flops"] / (gpu["bf16_tflops"] * 1e12), (work["bytes"] + extra_bytes) / bandwidth)
    scan = max(work["scan_exps"] / (gpu["exp_tera_per_s"] * 1e12), work["scan_flops"] / (gpu["fp32_tflops"] * 1e12),
               work["scan_bytes"] / bandwidth)
    return tensor + scan


def floor_throughput(config: dict[str, Any], dataset: str, method: str, stage: int | None = None) -> Throughput | None:
    """Images per second of ``method`` (``stage=1``: its first stage) at ``floor.gpu``'s peaks: the most
    any implementation reaches (:func:`seconds_per_image`; training adds Adam's traffic, shared by the
    batch); None when its work is not counted at these settings."""
    costs = method_costs(config, dataset, method, stage)
    if costs is None:
        return None
    gpu = floor_gpu(config)
    batch_size = train_settings(config, method, stage).get("batch_size", TrainSettings.batch_size)
    train = 1 / seconds_per_image(costs["train"], gpu, ADAM_BYTES_PER_PARAMETER * costs["parameters"] / batch_size)
    evaluate = 1 / seconds_per_image(costs["eval"], gpu)
    pseudo_masks = 1 / seconds_per_image(costs["pseudo_masks"], gpu) if "pseudo_masks" in costs else evaluate
    return Throughput(train, evaluate, pseudo_masks, f"floor ({config['floor']['gpu']})")


def _source(kind: str, detail: str, reason: str | None) -> str:
    # e.g. "assumed (config; not measured)"
    return f"{kind} ({detail}{f'; {reason}' if reason else ''})"


def _check_below_floor(config: dict[str, Any], dataset: str, method: str, stage: int | None,
                       speed: Throughput) -> None:
    floor = floor_throughput(config, dataset, method, stage)
    for key in SPEED_KEYS if floor is not None else ():
        if getattr(speed, key) > getattr(floor, key):
            raise ConfigError(f"throughput.{method}.{key}: {getattr(speed, key):g} images per second is above "
                              f"{method}'s floor on {config['floor']['gpu']} ({getattr(floor, key):.0f} at the "
                              "GPU's peaks, docs/gpu-hours.md): no GPU runs that fast; lower it, or remove the "
                              "entry to derive it from the floor")


def assumed_throughput(config: dict[str, Any], dataset: str, method: str, stage: int | None = None,
                       reason: str | None = None) -> Throughput:
    """The throughput of ``method`` (``stage=1``: its first stage) on ``dataset`` without a measurement:
    its own ``throughput`` entry, else derived from its floor, else ``throughput.default``; ``reason``
    (why there is no measurement) goes into ``source``."""
    table = config.get("throughput", {})
    floor = None if method in table else floor_throughput(config, dataset, method, stage)
    if floor is not None:
        efficiency = config["floor"]["efficiency"][model_family(method)]
        return Throughput(floor.train_images_per_s * efficiency, floor.eval_images_per_s * efficiency,
                          floor.pseudo_masks_images_per_s * efficiency,
                          _source("derived", f"{config['floor']['gpu']} floor x {efficiency:g}", reason))
    merged = {**table.get("default", {}), **table.get(method, {})}
    missing = [key for key in SPEED_KEYS if key not in merged]
    if missing:
        raise ConfigError(f"throughput.{method}: missing {', '.join(missing)} (and no throughput.default "
                          "entry gives them); expected images per second on one GPU, e.g. "
                          "throughput: {default: {train_images_per_s: 200, eval_images_per_s: 600}}")
    speed = Throughput(merged["train_images_per_s"], merged["eval_images_per_s"], merged["eval_images_per_s"],
                       _source("assumed", "config", reason))
    if method in table:
        _check_below_floor(config, dataset, method, stage, speed)
    return speed


def _without_weights(hparams: dict[str, Any]) -> dict[str, Any]:
    # A model's speed does not depend on its weights' values: a measurement applies whatever they name.
    return {key: value for key, value in hparams.items() if key not in WEIGHT_KEYS}


def method_throughput(config: dict[str, Any], dataset: str, method: str,
                      stage: int | None = None) -> Throughput:
    """The throughput of ``method`` (``stage=1``: its first stage) on ``dataset``: measured when the
    throughput file has it for this device type, batch size, image size and hyper-parameters, else
    the config's assumed numbers, with the reason in ``source``."""
    path = throughput_path(config)
    record = load_measured_throughput(path)
    if record is None:
        return assumed_throughput(config, dataset, method, stage)
    if record["device_type"] != training_device_type(config):
        reason = f"{path} was measured on {record['device_type']}"
    else:
        entry = record["methods"].get(method, {})
        entry = entry.get("stage1", {}) if stage == 1 else entry
        batch_size = train_settings(config, method, stage).get("batch_size", TrainSettings.batch_size)
        hparams = _without_weights(method_hparams(config, method, stage))
        if not entry:
            reason = "not measured"
        elif (entry["batch_size"] != batch_size
              or record["settings"]["image_size"] != dataset_image_size(config, dataset)
              or _without_weights(entry["hparams"]) != hparams):
            reason = "measured at other settings"
        else:
            return Throughput(entry["train_images_per_s"], entry["eval_images_per_s"],
                              entry.get("pseudo_masks_images_per_s", entry["eval_images_per_s"]),
                              f"measured ({record['device_name']}, {record['date'][:10]})")
    return assumed_throughput(config, dataset, method, stage, reason)


def train_gpu_hours(config: dict[str, Any], dataset: str, method: str, stage: int | None = None,
                    speed: Throughput | None = None, overhead: float = JOB_OVERHEAD_HOURS) -> float:
    """Estimated GPU-hours of training ``method`` (``stage=1``: its first stage) on ``dataset`` once, at
    ``speed`` (default :func:`method_throughput`) plus ``overhead`` hours."""
    speed = speed or method_throughput(config, dataset, method, stage)
    fit, select = training_images(config, dataset, method, stage)
    epochs = train_settings(config, method, stage).get("epochs", TrainSettings.epochs)
    seconds_per_epoch = fit / speed.train_images_per_s + select / speed.eval_images_per_s
    return epochs * seconds_per_epoch / 3600 + overhead


def evaluate_gpu_hours(config: dict[str, Any], dataset: str, method: str, speed: Throughput | None = None,
                       overhead: float = JOB_OVERHEAD_HOURS) -> float:
    """Estimated GPU-hours of evaluating one trained model of ``method`` on ``dataset``'s test split (at
    ``speed``, default :func:`method_throughput`, plus ``overhead`` hours)."""
    test = dataset_counts(config, dataset)["test"]
    speed = speed or method_throughput(config, dataset, method)
    return test / speed.eval_images_per_s / 3600 + overhead


def pseudo_masks_gpu_hours(config: dict[str, Any], dataset: str, method: str, speed: Throughput | None = None,
                           overhead: float = JOB_OVERHEAD_HOURS) -> float:
    """Estimated GPU-hours of writing a first stage's pseudo masks of ``dataset``'s training images (at
    the first stage's ``speed``, default :func:`method_throughput`, plus ``overhead`` hours)."""
    speed = speed or method_throughput(config, dataset, method, stage=1)
    training = dataset_counts(config, dataset)["training"]
    return training / speed.pseudo_masks_images_per_s / 3600 + overhead


def runtime_minutes(gpu_hours: float, attempt: int, max_hours: float) -> int:
    """SLURM time limit in minutes for a job estimated at ``gpu_hours``, growing with the attempt, at most
    ``max_hours`` (a training job cut off there resumes from its checkpoint in its next attempt)."""
    return min(math.ceil(gpu_hours * 60 * RUNTIME_MARGIN) * attempt, math.floor(max_hours * 60))


def gpu_jobs(config: dict[str, Any]) -> list[GpuJob]:
    """Every GPU job of the config's grid (datasets x methods x seeds), by the rule that runs it."""
    jobs = []
    for dataset in grid_datasets(config):
        for method in grid_methods(config):
            source = method_throughput(config, dataset, method).source
            hours = {"train": (train_gpu_hours(config, dataset, method), source),
                     "evaluate": (evaluate_gpu_hours(config, dataset, method), source)}
            if method in two_stage_methods():
                first = method_throughput(config, dataset, method, stage=1).source
                hours = {"train_stage1": (train_gpu_hours(config, dataset, method, stage=1), first),
                         "pseudo_masks": (pseudo_masks_gpu_hours(config, dataset, method), first), **hours}
            for seed in config["seeds"]:
                jobs.extend(GpuJob(rule, dataset, method, int(seed), job_hours, job_source)
                            for rule, (job_hours, job_source) in hours.items())
    return jobs


def format_plan(jobs: list[GpuJob]) -> str:
    """A Markdown table: GPU jobs and GPU-hours per dataset and method, with the totals."""
    cells: dict[tuple[str, str], list[GpuJob]] = {}
    for job in jobs:
        cells.setdefault((job.dataset, job.method), []).append(job)
    lines = ["| dataset | method | GPU jobs | GPU-hours per seed | GPU-hours | source |",
             "|---|---|---:|---:|---:|---|"]
    for (dataset, method), cell in cells.items():
        seeds = len({job.seed for job in cell})
        hours = sum(job.gpu_hours for job in cell)
        sources = " / ".join(dict.fromkeys(job.source for job in cell))
        lines.append(f"| {dataset} | {method} | {len(cell)} | {hours / seeds:.2f} | {hours:.1f} | "
                     f"{sources} |")
    total = sum(job.gpu_hours for job in jobs)
    per_rule = {rule: sum(job.rule == rule for job in jobs) for rule in dict.fromkeys(job.rule for job in jobs)}
    lines.append(f"| **total** | | {len(jobs)} | | {total:.1f} | |")
    lines.append("")
    lines.append(f"{len(jobs)} GPU jobs ({', '.join(f'{n} {rule}' for rule, n in per_rule.items())}), "
                 f"{total:.1f} GPU-hours estimated (largest job {max(job.gpu_hours for job in jobs):.2f} h).")
    return "\n".join(lines)


@dataclass(frozen=True)
class FloorRow:
    """One (dataset, method) of the grid: its counted work per image, the images its jobs process per
    seed, and its GPU-hours over all seeds at the floor and as estimated."""

    dataset: str
    method: str
    costs: dict[str, Any] | None
    trained_images: int
    predicted_images: int
    floor_hours: float | None
    estimate_hours: float


def floor_rows(config: dict[str, Any]) -> list[FloorRow]:
    """:class:`FloorRow` of every (dataset, method) of the grid; the floor hours leave out the per-job
    overhead (None where a stage's work is not counted)."""
    estimates: dict[tuple[str, str], float] = {}
    for job in gpu_jobs(config):
        estimates[job.dataset, job.method] = estimates.get((job.dataset, job.method), 0.0) + job.gpu_hours
    seeds = len(config["seeds"])
    rows = []
    for dataset in grid_datasets(config):
        counts = dataset_counts(config, dataset)
        for method in grid_methods(config):
            stages = training_stages(method)
            trained = predicted = 0
            for stage in stages:
                fit, select = training_images(config, dataset, method, stage)
                epochs = train_settings(config, method, stage).get("epochs", TrainSettings.epochs)
                trained += epochs * fit
                predicted += epochs * select + (counts["training"] if stage == 1 else counts["test"])
            floors = {stage: floor_throughput(config, dataset, method, stage) for stage in stages}
            hours = None
            if all(floors.values()):
                hours = sum(train_gpu_hours(config, dataset, method, stage, floors[stage], overhead=0)
                            for stage in stages)
                hours += evaluate_gpu_hours(config, dataset, method, floors[None], overhead=0)
                if 1 in floors:
                    hours += pseudo_masks_gpu_hours(config, dataset, method, floors[1], overhead=0)
                hours *= seeds
            rows.append(FloorRow(dataset, method, method_costs(config, dataset, method), trained, predicted,
                                 hours, estimates[dataset, method]))
    return rows


def format_floor(config: dict[str, Any]) -> str:
    """A Markdown table: per (dataset, method), the counted work per image, the images per seed, and the
    grid's GPU-hours at the floor of ``floor.gpu`` beside the estimate; with the totals."""
    gpu = floor_gpu(config)
    efficiency = ", ".join(f"{family} {value:g}" for family, value in config["floor"]["efficiency"].items())
    heading = (f"Floor on {config['floor']['gpu']}: {gpu['bf16_tflops']:g} TFLOP/s bf16 (tensor), "
               f"{gpu['fp32_tflops']:g} TFLOP/s fp32, {gpu['hbm_gb_s']:g} GB/s, {gpu['exp_tera_per_s']:g} T exp/s "
               f"({gpu['source']}). Efficiencies {efficiency}: the estimate of a method without a measured or "
               "configured throughput is its floor divided by its family's.")
    columns = ("dataset", "method", "family", "train GFLOPs/img", "train GB/img", "eval GFLOPs/img", "eval GB/img",
               "scan G exp/img (train)", "images trained / predicted per seed", "floor GPU-h", "estimate GPU-h",
               "estimate / floor")
    lines = [heading, "", f"| {' | '.join(columns)} |", "|---|---|---|" + "---:|" * (len(columns) - 3)]
    rows = floor_rows(config)
    for row in rows:
        costs = row.costs
        work = (["not counted", "", "", "", ""] if costs is None else
                [f"{costs['train']['flops'] / 1e9:.1f}", f"{costs['train']['bytes'] / 1e9:.2f}",
                 f"{costs['eval']['flops'] / 1e9:.1f}", f"{costs['eval']['bytes'] / 1e9:.2f}",
                 f"{costs['train']['scan_exps'] / 1e9:.2f}"])
        floor = ["", ""] if row.floor_hours is None else [f"{row.floor_hours:.1f}",
                                                          f"{row.estimate_hours / row.floor_hours:.1f}"]
        cells = [row.dataset, row.method, model_family(row.method), *work,
                 f"{row.trained_images:,} / {row.predicted_images:,}", floor[0], f"{row.estimate_hours:.1f}", floor[1]]
        lines.append(f"| {' | '.join(cells)} |")
    counted = [row for row in rows if row.floor_hours is not None]
    floor_total = sum(row.floor_hours for row in counted)
    totals = ["**total**", *[""] * 8, f"{floor_total:.1f}" if counted else "",
              f"{sum(row.estimate_hours for row in rows):.1f}",
              f"{sum(row.estimate_hours for row in counted) / floor_total:.1f}" if counted else ""]
    lines.append(f"| {' | '.join(totals)} |")
    if len(counted) < len(rows):
        missing = len(rows) - len(counted)
        note = (f"{missing} of {len(rows)} rows not counted at these settings (the total ratio is over the "
                "counted ones): `plan --floor` counts them.")
        lines += ["", note]
    return "\n".join(lines)
