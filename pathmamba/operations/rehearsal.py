"""A rehearsal of the paper's run on this machine (docs/rehearsal.md): ``config/config.yaml`` through the
whole workflow at the paper's model sizes, changed only where this machine cannot follow it.

The overlay (``config/rehearsal.yaml``) has three blocks:

``config``
    merged over the paper config: mappings key by key, the overlay's value winning, except that a
    dataset entry (``datasets.<name>``) is replaced whole, because a dataset comes one way only
    (``source: gdrive`` plus ``archive:`` would be both). It may change only the keys of
    :data:`CHANGEABLE` (data, counts and the machine), and may not add datasets or methods.
``archives``
    per dataset, the zip archive written for its ``archive`` entry: images per split, generator seed,
    how many masks are RGB images and whether one test image has no mask (the published quirks).
``snakemake``
    ``resources``: the rehearsal's ``snakemake --resources`` (e.g. ``mem_mb``, what may run at once).

Everything is written inside one rehearsal folder, which Snakemake runs in (``--directory``), so the
config's relative ``resources/`` and ``results/`` paths resolve inside it and never reach a real run's
files (random weights under the real ``resources/weights/`` would poison it). The folder is marked as
the rehearsal's on creation; a folder without the mark is never written to.

After the run: every ``run.json`` is checked against what the paper config gives its method (the
overlay changed only data, weights and counts), the training logs against the weights files they
must have loaded, and each job's peak memory (``max_rss`` of its benchmark file) against its rule's
``mem_mb`` request at the first attempt (what a cluster would kill it for). The report goes to
``<folder>/rehearsal.md``.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePath
from typing import Any

import yaml

from pathmamba.core.files import atomic_write_text, normalised_path
from pathmamba.core.layout import (
    BENCHMARK_ROOT,
    HISTORY,
    LOGS,
    REPO,
    REPORT,
    RUN_RECORD,
    STAGE1,
    TEST_METRICS,
    WEIGHTS,
    configured_experiment_dir,
    run_path,
    weights_backbone,
)
from pathmamba.core.settings import TrainSettings
from pathmamba.data.specs import dataset_names, get_dataset_spec
from pathmamba.engine.config import (
    ConfigError,
    all_fetched_weights,
    check_schema,
    fetched_weights,
    method_hparams,
    train_settings,
)
from pathmamba.engine.registry import get_spec, method_names, training_stages, two_stage_methods
from pathmamba.operations.plan import REAL_IMAGE_SIZE

log = logging.getLogger("pathmamba.operations.rehearsal")

PAPER_CONFIG = REPO / "config" / "config.yaml"
OVERLAY = REPO / "config" / "rehearsal.yaml"
SNAKEFILE = REPO / "workflow" / "Snakefile"
#: The file that marks a folder as a rehearsal's own.
MARKER = ".pathmamba-rehearsal"
#: The keys of the paper config an overlay may change (dotted; ``*`` is any one key; a key covers
#: everything below it): where the data comes from, how many runs and epochs (a method's own schedule's
#: epoch counts, ``MethodSpec.epochs_from``, included), the batch size (capped by the few generated
#: images), and what a CPU-only machine cannot follow (device, fused scan, bf16).
CHANGEABLE = (
    "experiment", "seeds", "threads_per_job", "datasets.*",
    "train.epochs", "train.batch_size", "train.device", "train.scan", "train.precision",
    "methods.*.train.epochs", "methods.*.train.batch_size",
    "methods.*.stage1.train.epochs", "methods.*.stage1.train.batch_size",
    *(f"methods.{method}.hparams.{key}" for method in method_names() for key in get_spec(method).epochs_from),
)
#: Training settings the paper config leaves unset and the job resolves for its machine (data loader
#: workers: threads - 1 on CUDA, 0 on the CPU); run.json records the resolved value.
RESOLVED_AT_RUN_TIME = ("workers",)
OVERLAY_BLOCKS = ("config", "archives", "snakemake")
ARCHIVE_KEYS = {"n_train", "n_val", "n_test", "seed", "rgb_masks", "unpaired_test_image"}
#: The training jobs' files, by job name (the benchmark file's stem): run.json's folder in the run.
TRAINING_JOBS = {"train": "", "train_stage1": STAGE1}


class RehearsalError(ValueError):
    """The overlay, the rehearsal folder or the finished run is not what the rehearsal needs."""


def load_yaml(path: Path) -> dict[str, Any]:
    value = yaml.safe_load(Path(path).read_text())
    if not isinstance(value, dict):
        raise RehearsalError(f"{path}: expected a YAML mapping, got {type(value).__name__}")
    return value


# --- the effective config -------------------------------------------------------------------------------


def _merge(base: dict[str, Any], overlay: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        here = (*path, key)
        replace_whole = here[:1] == ("datasets",) and len(here) == 2
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not replace_whole:
            merged[key] = _merge(merged[key], value, here)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (added and removed keys too; lists whole)."""
    if isinstance(before, dict) and isinstance(after, dict):
        changed = []
        for key in list(before) + [key for key in after if key not in before]:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in before or key not in after:
                changed.append(dotted)
            else:
                changed += changed_keys(before[key], after[key], dotted)
        return changed
    return [] if before == after else [prefix]


def _changeable(key: str) -> bool:
    parts = key.split(".")
    return any(len(parts) >= len(pattern.split(".")) and
               all(want in ("*", got) for want, got in zip(pattern.split("."), parts, strict=False))
               for pattern in CHANGEABLE)


def apply_overlay(paper: dict[str, Any], overlay_config: dict[str, Any]) -> dict[str, Any]:
    """The paper config with the overlay's ``config`` block merged over it (module docstring).

    Raises :class:`RehearsalError` when the overlay adds a dataset or method, or changes a key outside
    :data:`CHANGEABLE`.
    """
    for block in ("datasets", "methods"):
        extra = sorted(set(overlay_config.get(block, {})) - set(paper.get(block, {})))
        if extra:
            raise RehearsalError(f"overlay config.{block}: {', '.join(extra)} not in the paper config; a "
                                 f"rehearsal runs the paper's {block}, it adds none")
    effective = _merge(paper, overlay_config)
    refused = [key for key in changed_keys(paper, effective) if not _changeable(key)]
    if refused:
        raise RehearsalError("overlay config changes keys a rehearsal must keep as the paper config has them: "
                             f"{', '.join(refused)}; it may change only {', '.join(CHANGEABLE)}")
    return effective


def _relative_inside(value: str) -> bool:
    path = PurePath(value)
    return not path.is_absolute() and ".." not in path.parts


def check_effective_config(config: dict[str, Any], archives: dict[str, Any]) -> None:
    """Everything the rehearsal writes must land inside its folder, and nothing may be downloaded: raise
    :class:`RehearsalError` naming the key otherwise. Also checks the schema (with its defaults)."""
    problems = []
    for key in ("results_dir", "resources_dir"):
        if not _relative_inside(str(config.get(key, ""))):
            problems.append(f"{key}: {config.get(key)!r}; the rehearsal needs a relative path without '..' "
                            "(it resolves inside the rehearsal folder)")
    for name, entry in config["datasets"].items():
        parts = [entry["archive"]] if isinstance(entry.get("archive"), str) else entry.get("archive", [])
        if len(parts) != 1 or not _relative_inside(parts[0]):
            problems.append(f"datasets.{name}: {entry}; the rehearsal downloads nothing and writes one archive "
                            "per dataset: give 'archive: <relative path>.zip' in the overlay")
        if name not in archives:
            problems.append(f"archives.{name}: missing; give n_train, n_val, n_test, seed, rgb_masks and "
                            "unpaired_test_image of the archive to write")
    for name, spec in archives.items():
        if name not in config["datasets"]:
            problems.append(f"archives.{name}: not a dataset of the config ({', '.join(config['datasets'])})")
        elif not isinstance(spec, dict) or set(spec) != ARCHIVE_KEYS:
            problems.append(f"archives.{name}: {spec!r}; expected exactly the keys {', '.join(sorted(ARCHIVE_KEYS))}")
    if problems:
        raise RehearsalError("overlay:\n  " + "\n  ".join(problems))
    try:
        check_schema(copy.deepcopy(config))
    except ConfigError as error:
        raise RehearsalError(f"the effective config does not pass the workflow's schema: {error}") from None


# --- the rehearsal folder and what goes into it ----------------------------------------------------------


def claim_folder(folder: Path) -> Path:
    """Create ``folder`` and mark it as a rehearsal's, or reuse one so marked; refuse any other folder."""
    folder = normalised_path(Path(folder).absolute())  # `new/..` is this folder: nothing to create
    if folder.exists():
        if not (folder / MARKER).is_file():
            raise RehearsalError(f"{folder} exists and was not created by a rehearsal (no {MARKER} in it); "
                                 "give a new folder: a rehearsal writes random weights and results there")
        return folder
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("A folder of `python -m pathmamba rehearse` (docs/rehearsal.md): random weights "
                                 "and generated data; never use its resources/ for a real run.\n")
    return folder


def weights_files(config: dict[str, Any]) -> dict[str, str]:
    """{path: backbone} of every ``<resources_dir>/`` :data:`pathmamba.core.layout.WEIGHTS` file that a method (or
    its first stage) names: the files the workflow's fetch_weights rule would download."""
    from pathmamba.models.backbones import RESNETS

    files = {}
    for path in all_fetched_weights(config):
        backbone = weights_backbone(config["resources_dir"], path)
        if backbone not in RESNETS:
            raise RehearsalError(f"{path!r} (named by a method's hparams) is not a fetch_weights file "
                                 f"(<resources_dir>/{WEIGHTS.format(backbone='<' + '|'.join(RESNETS) + '>')})")
        files[path] = backbone
    return files


def write_random_weights(path: Path, backbone: str) -> None:
    """``backbone`` with random weights, its state dict saved at ``path``: the exact keys and shapes of
    torchvision's ImageNet file (tests/test_backbones.py), so that the real loading code runs."""
    from pathmamba.core.torch_files import atomic_torch_save
    from pathmamba.models.backbones import build_resnet

    atomic_torch_save(build_resnet(backbone).state_dict(), Path(path))


def write_archive(archive: Path, dataset: str, n_train: int, n_val: int, n_test: int, seed: int,
                  rgb_masks: int, unpaired_test_image: bool, size: int = REAL_IMAGE_SIZE) -> None:
    """A zip of generated H&E-like images in ``dataset``'s published layout: its file-name patterns and
    palette (from the synthetic dataset of the same layout), a nested top folder named like the archive,
    ``rgb_masks`` RGB masks, optionally a test image without a mask. Written atomically."""
    from pathmamba.data.synthetic import make_synthetic_dataset, published_copy, zip_folder

    spec = get_dataset_spec(dataset)
    twin = next(name for name in dataset_names()
                if (other := get_dataset_spec(name)).synthetic and other.synthetic.imitates == spec.name)
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    # A fresh folder of this call's own (a pid-named one may be a leftover of another process): the
    # clean-up below deletes nothing else.
    building = Path(tempfile.mkdtemp(prefix=f".{archive.name}.building-", dir=archive.parent))
    try:
        make_synthetic_dataset(twin, building / "canonical", n_train, n_val, n_test, size=size, seed=seed)
        outer = published_copy(building / "canonical", building / "wild" / archive.stem, spec,
                               rgb_masks=rgb_masks, unpaired_test_image=unpaired_test_image)
        os.replace(zip_folder(outer, building / archive.name), archive)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def prepare_folder(folder: Path, config: dict[str, Any], archives: dict[str, Any], source_note: str) -> Path:
    """Write the effective config, the archives and the weights files into ``folder`` (those already there
    are kept: a rerun in the same folder resumes); returns the config's path."""
    config_path = folder / "config.yaml"
    atomic_write_text(config_path, f"# {source_note}\n" + yaml.safe_dump(config, sort_keys=False))
    for name, spec in archives.items():
        archive = folder / config["datasets"][name]["archive"]
        if not archive.exists():
            archive.parent.mkdir(parents=True, exist_ok=True)
            size = config["datasets"][name].get("validate", {}).get("image_size", REAL_IMAGE_SIZE)
            log.info("writing %s (%s)", archive, name)
            write_archive(archive, name, size=size, **spec)
    for path, backbone in weights_files(config).items():
        if not (folder / path).exists():
            log.info("writing random %s weights to %s", backbone, folder / path)
            write_random_weights(folder / path, backbone)
    return config_path


# --- running the workflow --------------------------------------------------------------------------------


def snakemake_command(folder: Path, config_path: Path, *extra: str) -> list[str]:
    beside = Path(sys.executable).with_name("snakemake")
    executable = str(beside) if beside.exists() else shutil.which("snakemake") or "snakemake"
    return [executable, "--snakefile", str(SNAKEFILE), "--directory", str(folder),
            "--configfile", str(config_path), *extra]


def _workflow_env() -> dict[str, str]:
    """This Python first on PATH: the rules call ``python -m pathmamba``."""
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def run_logged(command: list[str], log_path: Path) -> int:
    """Run ``command`` (no shell), its output both on stderr and in ``log_path``; returns its status."""
    with open(log_path, "a") as log_file, subprocess.Popen(command, stdout=subprocess.PIPE,
                                                           stderr=subprocess.STDOUT, text=True,
                                                           env=_workflow_env()) as process:
        try:
            for line in process.stdout:
                sys.stderr.write(line)
                log_file.write(line)
        except BaseException:  # the rehearsal stopped (SIGTERM, Ctrl-C): Snakemake cancels its running jobs on
            process.send_signal(signal.SIGINT)  # SIGINT, and ends (on SIGTERM it would wait for them)
            raise
    return process.returncode


def memory_requests(folder: Path, config_path: Path) -> dict[str, tuple[str, int]]:
    """{benchmark file: (rule, mem_mb)} of every job of the grid at its first attempt, from a dry run."""
    result = subprocess.run(snakemake_command(folder, config_path, "--dry-run", "--forceall", "--cores", "1"),
                            capture_output=True, text=True, env=_workflow_env(), check=False)
    if result.returncode != 0:
        raise RehearsalError(f"snakemake --dry-run failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return parse_job_blocks(result.stdout + result.stderr)


def parse_job_blocks(text: str) -> dict[str, tuple[str, int]]:
    """{benchmark: (rule, mem_mb)} from the job blocks Snakemake prints (``rule x:`` then indented
    ``benchmark:`` and ``resources: ..., mem_mb=N, ...`` lines); jobs without a benchmark are left out."""
    requests = {}
    for block in re.split(r"^(?:local)?rule ", text, flags=re.MULTILINE)[1:]:
        rule = block.split(":", 1)[0]
        benchmark = re.search(r"^\s+benchmark: (.+)$", block, flags=re.MULTILINE)
        memory = re.search(r"^\s+resources: .*\bmem_mb=(\d+)", block, flags=re.MULTILINE)
        if benchmark and memory:
            requests[benchmark[1].strip()] = (rule, int(memory[1]))
    return requests


# --- checks after the run --------------------------------------------------------------------------------


def experiment_folder(config: dict[str, Any], folder: Path) -> Path:
    return folder / configured_experiment_dir(config["results_dir"], config["experiment"])


def expected_record(paper: dict[str, Any], effective: dict[str, Any], method: str,
                    stage: int | None) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """(hparams, settings, keys the overlay changed) that run.json must record for ``method`` (``stage=1``:
    its first stage): the paper config's, except the settings the overlay changed, which are the
    effective config's. A method trained on its first stage's pseudo masks records that stage's
    hparams as ``stage1_hparams``."""
    hparams = method_hparams(paper, method, stage)
    schedule = get_spec(method, stage).epochs_from
    hparams.update({key: value for key, value in method_hparams(effective, method, stage).items() if key in schedule})
    if stage is None and get_spec(method).supervision == "pseudo":
        hparams["stage1_hparams"] = method_hparams(paper, method, 1)
    paper_settings = asdict(TrainSettings(**train_settings(paper, method, stage)))
    effective_settings = asdict(TrainSettings(**train_settings(effective, method, stage)))
    changed = {key for key in paper_settings if paper_settings[key] != effective_settings[key]}
    return hparams, {**paper_settings, **{key: effective_settings[key] for key in changed}}, changed


def check_runs(paper: dict[str, Any], effective: dict[str, Any], folder: Path) -> list[str]:
    """Problems of the run's run.json files: missing ones, and hparams or settings other than
    :func:`expected_record`'s (settings of :data:`RESOLVED_AT_RUN_TIME` that the paper leaves unset
    excepted). Empty when all agree."""
    problems = []
    experiment_dir = experiment_folder(effective, folder)
    for dataset in effective["datasets"]:
        for method in effective["methods"]:
            for seed in effective["seeds"]:
                for stage in training_stages(method):
                    path = run_path(experiment_dir, dataset, method, seed) / (STAGE1 if stage else "") / RUN_RECORD
                    if not path.is_file():
                        problems.append(f"{path}: missing")
                        continue
                    record = json.loads(path.read_text())
                    hparams, settings, _ = expected_record(paper, effective, method, stage)
                    if record["hparams"] != hparams:
                        problems.append(f"{path}: hparams {record['hparams']}, the paper config gives {hparams}")
                    for key in (field.name for field in fields(TrainSettings)):
                        if key in RESOLVED_AT_RUN_TIME and settings[key] is None:
                            continue
                        if record["settings"].get(key) != settings[key]:
                            problems.append(f"{path}: settings.{key} = {record['settings'].get(key)!r}, "
                                            f"expected {settings[key]!r}")
    return problems


def check_weights_loaded(effective: dict[str, Any], folder: Path) -> list[str]:
    """Problems: a training log without the loader's line for a weights file its job names."""
    problems = []
    experiment_dir = experiment_folder(effective, folder)
    for dataset in effective["datasets"]:
        for method in effective["methods"]:
            for seed in effective["seeds"]:
                for job, stage in (("train", None), ("train_stage1", 1)):
                    if stage == 1 and method not in two_stage_methods():
                        continue
                    log_path = experiment_dir / LOGS.format(dataset=dataset, method=method, seed=seed) / f"{job}.log"
                    text = log_path.read_text() if log_path.is_file() else ""
                    for value in fetched_weights(effective, method, stage):
                        if not re.search(rf"loaded .*weights from {re.escape(value)}$", text, flags=re.MULTILINE):
                            problems.append(f"{log_path}: no line saying {value} was loaded")
    return problems


@dataclass
class JobCost:
    """One job's benchmark against its rule's memory request."""

    dataset: str
    method: str
    job: str
    wall_s: float
    images: int | None
    loop_s_per_image: float | None
    peak_mb: float
    mem_mb: int

    @property
    def over(self) -> bool:
        return self.peak_mb > self.mem_mb


def _images(run: Path, job: str) -> tuple[int | None, float | None]:
    """(images the job processed, training-loop seconds per image) from the run's files."""
    if job in TRAINING_JOBS:
        record = json.loads((run / TRAINING_JOBS[job] / RUN_RECORD).read_text())
        with open(run / TRAINING_JOBS[job] / HISTORY) as handle:
            seconds = sum(float(row["seconds"]) for row in csv.DictReader(handle))
        images = record["train_images"] * record["settings"]["epochs"]
        return images, seconds / images
    if job == "pseudo_masks":
        return json.loads((run / STAGE1 / RUN_RECORD).read_text())["train_images"], None
    if job == "evaluate":
        return json.loads((run / TEST_METRICS).read_text())["test_images"], None
    return None, None


def job_costs(effective: dict[str, Any], folder: Path, requests: dict[str, tuple[str, int]]) -> list[JobCost]:
    """Every job with a benchmark file of the grid, in the dry run's order of datasets, methods, jobs."""
    results = configured_experiment_dir(effective["results_dir"], effective["experiment"])
    costs = []
    for benchmark, (rule, mem_mb) in sorted(requests.items()):
        path = folder / benchmark
        parts = Path(benchmark).relative_to(results / BENCHMARK_ROOT).parts  # dataset, method, seedN, job.tsv
        if not path.is_file() or len(parts) != 4:
            continue
        with open(path) as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        run = run_path(folder / results, parts[0], parts[1], int(parts[2].removeprefix("seed")))
        images, loop = _images(run, rule)
        costs.append(JobCost(parts[0], parts[1], rule, float(row["s"]), images, loop,
                             float(row["max_rss"]), mem_mb))
    order = {method: i for i, method in enumerate(effective["methods"])}
    return sorted(costs, key=lambda c: (list(effective["datasets"]).index(c.dataset), order[c.method], c.job))


def _number(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def cost_table(costs: list[JobCost]) -> str:
    lines = [("| method | dataset | job | wall s | images | s per image (job) | s per image (training loop) "
              "| peak MB | mem_mb request | flag |"), "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for cost in costs:
        per_image = cost.wall_s / cost.images if cost.images else None
        lines.append(f"| {cost.method} | {cost.dataset} | {cost.job} | {cost.wall_s:.1f} | {cost.images or '—'} "
                     f"| {_number(per_image, 2)} | {_number(cost.loop_s_per_image, 2)} | {cost.peak_mb:.0f} "
                     f"| {cost.mem_mb} | {'OVER the request' if cost.over else ''} |")
    return "\n".join(lines)


def format_report(changes: list[str], costs: list[JobCost], problems: list[str], wall_s: float,
                  status: int) -> str:
    over = [cost for cost in costs if cost.over]
    lines = [
        "# Rehearsal of the paper config", "",
        f"Snakemake exit status {status}; wall time of the rehearsal {wall_s / 60:.1f} min.", "",
        "Keys the overlay changed (config/rehearsal.yaml): " + ", ".join(f"`{key}`" for key in changes) + ".", "",
        "## Jobs: time and peak memory", "",
        ("Wall s and peak MB (`max_rss`) from each job's Snakemake benchmark file; images: training images x "
         "epochs (train jobs), training images (pseudo masks), test images (evaluate); the training loop's "
         "seconds from history.csv. A job over its rule's `mem_mb` request (first attempt) would be killed on "
         "a cluster that enforces it."), "",
        cost_table(costs), "",
        f"{len(over)} of {len(costs)} jobs over their memory request"
        + (": " + ", ".join(f"{c.method}/{c.dataset}/{c.job} ({c.peak_mb:.0f} > {c.mem_mb} MB)" for c in over)
           if over else "") + ".", "",
        "## Checks", "",
    ]
    lines += [f"- {problem}" for problem in problems] or [
        "- every run.json records the paper config's hyper-parameters and settings (except the overlay's keys)",
        "- every training log shows the weights files of its job loaded"]
    return "\n".join(lines) + "\n"


# --- all of it -------------------------------------------------------------------------------------------


def rehearse(folder: Path, paper_path: Path = PAPER_CONFIG, overlay_path: Path = OVERLAY,
             cores: int | None = None) -> int:
    """Run the paper config with the overlay in ``folder``, check the run and write ``rehearsal.md``;
    returns 0 when Snakemake and every check succeeded, else 1."""
    started = time.time()
    paper, overlay = load_yaml(paper_path), load_yaml(overlay_path)
    unknown = sorted(set(overlay) - set(OVERLAY_BLOCKS))
    if unknown or "config" not in overlay or "archives" not in overlay:
        raise RehearsalError(f"{overlay_path}: blocks {', '.join(overlay)}; expected config, archives and "
                             f"optionally snakemake")
    effective = apply_overlay(paper, overlay["config"])
    check_effective_config(effective, overlay["archives"])
    folder = claim_folder(folder)
    config_path = prepare_folder(folder, effective, overlay["archives"],
                                 f"{paper_path} with the overlay {overlay_path}, written by `python -m pathmamba "
                                 "rehearse` (docs/rehearsal.md)")
    resources = [f"{key}={value}" for key, value in overlay.get("snakemake", {}).get("resources", {}).items()]
    run_log = folder / "snakemake.log"
    status = run_logged(snakemake_command(folder, config_path, "--cores", str(cores or os.cpu_count()),
                                          *(["--resources", *resources] if resources else [])), run_log)
    if status == 0:
        report_path = str(configured_experiment_dir(effective["results_dir"], effective["experiment"]) / REPORT)
        status = run_logged(snakemake_command(folder, config_path, "--report", report_path), run_log)
    problems = check_runs(paper, effective, folder) + check_weights_loaded(effective, folder)
    if status != 0:
        problems.insert(0, f"snakemake failed (exit status {status}): see {run_log} and the job logs it names")
    costs = job_costs(effective, folder, memory_requests(folder, config_path))
    report = format_report(changed_keys(paper, effective), costs, problems, time.time() - started, status)
    atomic_write_text(folder / "rehearsal.md", report)
    print(report)
    log.info("wrote %s", folder / "rehearsal.md")
    return 1 if problems else 0
