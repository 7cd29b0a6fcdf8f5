"""GPU planning: the GPU jobs of a workflow config and their estimated GPU-hours.

``snakemake -n`` counts jobs but not their cost. The cost of one training job is estimated from the
dataset's image counts and the method's measured throughput, given in the config's ``throughput``
block (images per second on one GPU; a ``default`` entry covers methods without their own):

    train hours        = epochs * (n_train / train_images_per_s + n_val / eval_images_per_s) / 3600
    evaluate hours     = n_test / eval_images_per_s / 3600
    pseudo-mask hours  = n_train / eval_images_per_s / 3600

(validation runs once per epoch for model selection). A two-stage method (wsss-tissue) has three jobs
before its evaluation: its first stage (epochs of ``methods.<method>.stage1.train``), the pseudo masks
and its second stage; all three use the method's throughput entry. The same estimates size the SLURM
``runtime`` of the rules (workflow/rules/train.smk, evaluate.smk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pathmamba.config import ConfigError, train_settings
from pathmamba.data.specs import get_dataset_spec
from pathmamba.registry import two_stage_methods
from pathmamba.settings import TrainSettings

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
# A GPU job's fixed cost beyond the images: start-up, imports, data indexing, checkpoint writes.
JOB_OVERHEAD_HOURS = 5 / 60
# SLURM runtime limit = estimate x margin (first attempt); retries multiply it by the attempt number.
RUNTIME_MARGIN = 1.5


@dataclass(frozen=True)
class GpuJob:
    """One GPU job of the grid and its estimated cost in GPU-hours."""

    rule: str
    dataset: str
    method: str
    seed: int
    gpu_hours: float


def load_workflow_config(path: Path) -> dict[str, Any]:
    """The config file at ``path`` checked against the workflow's schema, with its defaults filled in
    (as Snakemake does), so that the plan sees the values the workflow runs with."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = yaml.safe_load(Path(path).read_text())
    try:
        validate(config, str(SCHEMA))
    except WorkflowError as error:
        raise ConfigError(str(error)) from None
    return config


def dataset_counts(config: dict[str, Any], dataset: str) -> dict[str, int]:
    """Images per split of ``dataset``: the configured synthetic sizes, else the published counts."""
    entry = config["datasets"][dataset]
    if "synthetic" in entry:
        sizes = entry["synthetic"]
        return {"training": sizes["n_train"], "val": sizes["n_val"], "test": sizes["n_test"]}
    counts = get_dataset_spec(dataset).counts
    if counts is None:
        raise ConfigError(f"datasets.{dataset}: no published image counts to plan with; "
                          "give a 'synthetic' block or use a dataset with known counts")
    return counts


def method_throughput(config: dict[str, Any], method: str) -> dict[str, float]:
    """``{"train_images_per_s", "eval_images_per_s"}`` of ``method``: its own entry over ``default``."""
    table = config.get("throughput", {})
    merged = {**table.get("default", {}), **table.get(method, {})}
    missing = [key for key in ("train_images_per_s", "eval_images_per_s") if key not in merged]
    if missing:
        raise ConfigError(f"throughput.{method}: missing {', '.join(missing)} (and no throughput.default "
                          "entry gives them); expected images per second on one GPU, e.g. "
                          "throughput: {default: {train_images_per_s: 200, eval_images_per_s: 600}}")
    return merged


def train_gpu_hours(config: dict[str, Any], dataset: str, method: str, stage: int | None = None) -> float:
    """Estimated GPU-hours of training ``method`` (``stage=1``: its first stage) on ``dataset`` once."""
    counts = dataset_counts(config, dataset)
    speed = method_throughput(config, method)
    epochs = train_settings(config, method, stage).get("epochs", TrainSettings.epochs)
    seconds_per_epoch = (counts["training"] / speed["train_images_per_s"]
                         + counts["val"] / speed["eval_images_per_s"])
    return epochs * seconds_per_epoch / 3600 + JOB_OVERHEAD_HOURS


def evaluate_gpu_hours(config: dict[str, Any], dataset: str, method: str) -> float:
    """Estimated GPU-hours of evaluating one trained model of ``method`` on ``dataset``'s test split."""
    counts = dataset_counts(config, dataset)
    return counts["test"] / method_throughput(config, method)["eval_images_per_s"] / 3600 + JOB_OVERHEAD_HOURS


def pseudo_masks_gpu_hours(config: dict[str, Any], dataset: str, method: str) -> float:
    """Estimated GPU-hours of writing a first stage's pseudo masks of ``dataset``'s training images."""
    counts = dataset_counts(config, dataset)
    return counts["training"] / method_throughput(config, method)["eval_images_per_s"] / 3600 + JOB_OVERHEAD_HOURS


def runtime_minutes(gpu_hours: float, attempt: int) -> int:
    """SLURM time limit in minutes for a job estimated at ``gpu_hours``, growing with the attempt."""
    return math.ceil(gpu_hours * 60 * RUNTIME_MARGIN) * attempt


def gpu_jobs(config: dict[str, Any]) -> list[GpuJob]:
    """Every GPU job of the config's grid (datasets x methods x seeds), by the rule that runs it."""
    jobs = []
    for dataset in config["datasets"]:
        for method in config["methods"]:
            hours = {"train": train_gpu_hours(config, dataset, method),
                     "evaluate": evaluate_gpu_hours(config, dataset, method)}
            if method in two_stage_methods():
                hours = {"train_stage1": train_gpu_hours(config, dataset, method, stage=1),
                         "pseudo_masks": pseudo_masks_gpu_hours(config, dataset, method), **hours}
            for seed in config["seeds"]:
                jobs.extend(GpuJob(rule, dataset, method, int(seed), job_hours) for rule, job_hours in hours.items())
    return jobs


def format_plan(jobs: list[GpuJob]) -> str:
    """A Markdown table: GPU jobs and GPU-hours per dataset and method, with the totals."""
    cells: dict[tuple[str, str], list[GpuJob]] = {}
    for job in jobs:
        cells.setdefault((job.dataset, job.method), []).append(job)
    lines = ["| dataset | method | GPU jobs | GPU-hours per seed | GPU-hours |", "|---|---|---:|---:|---:|"]
    for (dataset, method), cell in cells.items():
        seeds = len({job.seed for job in cell})
        hours = sum(job.gpu_hours for job in cell)
        lines.append(f"| {dataset} | {method} | {len(cell)} | {hours / seeds:.2f} | {hours:.1f} |")
    total = sum(job.gpu_hours for job in jobs)
    per_rule = {rule: sum(job.rule == rule for job in jobs) for rule in dict.fromkeys(job.rule for job in jobs)}
    lines.append(f"| **total** | | {len(jobs)} | | {total:.1f} |")
    lines.append("")
    lines.append(f"{len(jobs)} GPU jobs ({', '.join(f'{n} {rule}' for rule, n in per_rule.items())}), "
                 f"{total:.1f} GPU-hours estimated (largest job {max(job.gpu_hours for job in jobs):.2f} h).")
    return "\n".join(lines)
