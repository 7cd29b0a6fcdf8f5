import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.0")

# The rules call `python -m pathmamba`; this makes the checkout importable without installing it,
# also inside conda environments and cluster jobs (which evaluate this file again).
REPO = str(Path(workflow.basedir).parent)
sys.path.insert(0, REPO)


def shell_word(text):
    """``text`` as one shell word, for a command string that Snakemake formats once more (braces doubled)."""
    return shlex.quote(text).replace("{", "{{").replace("}", "}}")


# Every value put into a rule's shell command is quoted with `:q` (lists: each item), so that no config
# value or path is ever read by the shell: a space, an apostrophe or `$(...)` in it stays one argument.
# The fork server is started with the same PYTHONPATH (pathmamba/forkserver.py, job_environment).
shell.prefix(f"set -euo pipefail; export PYTHONPATH={shell_word(REPO)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

from pathmamba.core import cpu_pins, layout
from pathmamba.core.gpus import (
    LOCK_DIR_VARIABLE,
    POOL_VARIABLE,
    default_lock_dir,
    gpu_pool,
    threads_per_job,
)
from pathmamba.engine.config import (
    ConfigError,
    check_config,
    check_renamed_keys,
    dataset_archives,
    fetched_weights,
    grid_datasets,
    grid_methods,
    load_yaml,
    method_hparams,
    train_settings,
)
from pathmamba.engine.registry import two_stage_methods
from pathmamba.operations.plan import (
    evaluate_gpu_hours,
    pseudo_masks_gpu_hours,
    runtime_minutes,
    train_gpu_hours,
)

try:
    # Snakemake's own YAML reading lets a key given twice silently win; read each config file again.
    for configfile in workflow.configfiles:
        load_yaml(configfile)
    check_renamed_keys(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None
validate(config, "../schemas/config.schema.yaml")
try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

# The CPU pins of every job and of the fork server, which inherit this process's environment; cluster
# jobs evaluate this file again. Importing pathmamba set the default pins already (pathmamba/core/cpu_pins.py).
cpu_pins.apply(config["cpu_pins"])


def config_paths():
    """(key, path) of every folder or file that the config names; they end up in rule patterns."""
    yield "results_dir", config["results_dir"]
    yield "resources_dir", config["resources_dir"]
    for name, entry in config["datasets"].items():
        if "description" in entry:
            yield f"datasets.{name}.description", entry["description"]
        if "root" in entry:
            yield f"datasets.{name}.root", entry["root"]
        for archive in dataset_archives(entry):
            yield f"datasets.{name}.archive", archive


# Any other character may be in a path (the commands get them quoted), but braces would be read as
# wildcards of the rules' file patterns, NUL or a line break cannot be in a usable path, and a leading
# `-` would make the path an option of the command it is given to.
UNUSABLE_IN_PATHS = {"{": "'{'", "}": "'}'", "\0": "NUL", "\n": "a line break", "\r": "a carriage return"}


def path_problem(key, path):
    if not path:
        return f"{key}: the path is empty"
    if path.startswith("-"):
        return f"{key}: {path!r} starts with '-', which a command would read as an option; write './{path}'"
    found = [name for char, name in UNUSABLE_IN_PATHS.items() if char in path]
    if found:
        return (
            f"{key}: {path!r} contains {', '.join(found)}; paths of this workflow cannot hold braces "
            "(Snakemake reads them as wildcards), NUL or line breaks"
        )
    return None


PATH_PROBLEMS = [problem for key, path in config_paths() if (problem := path_problem(key, path))]
if PATH_PROBLEMS:
    raise WorkflowError("invalid config:\n  " + "\n  ".join(PATH_PROBLEMS))

RESULTS = str(layout.configured_experiment_dir(config["results_dir"], config["experiment"]))
RESOURCES = config["resources_dir"]
DATASETS = grid_datasets(config)
METHODS = grid_methods(config)
SEEDS = [int(seed) for seed in config["seeds"]]
# The experiment folder's layout is pathmamba/core/layout.py's, for the rules and the code alike.
EXPERIMENT_DIR = f"{RESULTS}/{layout.RUN}"
TRIVIAL_EXPERIMENT_DIR = f"{RESULTS}/{layout.TRIVIAL_RUN}"
LOG_DIR = f"{RESULTS}/{layout.LOGS}"
CHECKPOINT_DIR = f"{RESULTS}/{layout.CHECKPOINTS}"
BENCHMARK_DIR = f"{RESULTS}/{layout.BENCHMARKS}"
# Two-stage methods (wsss-tissue): a first stage trained on its own, then its pseudo masks of the
# training images, then the method itself trained on them; three jobs, so a change to a later step
# does not redo the earlier ones.
TWO_STAGE_METHODS = [method for method in METHODS if method in two_stage_methods()]
STAGE1_DIR = f"{EXPERIMENT_DIR}/{layout.STAGE1}"
STAGE1_MODEL = f"{STAGE1_DIR}/{layout.MODEL}"
PSEUDO_MASKS = f"{EXPERIMENT_DIR}/{layout.PSEUDO_MASKS}"
# <resources_dir>/: datasets, downloads, checksums and weights, shared by every run.
DATASET_DIR = f"{RESOURCES}/{layout.DATASET}"


def job_log(job, folder=LOG_DIR):
    """The log of a job of rule ``job`` in ``folder`` (a run's logs by default)."""
    return f"{folder}/{layout.JOB_LOG.format(job=job)}"


def benchmark_file(job):
    """The Snakemake benchmark file of a run's job of rule ``job``."""
    return f"{BENCHMARK_DIR}/{layout.BENCHMARK_FILES[job]}"


# GPUs of a local run (pathmamba/core/gpus.py): the `gpu` resource gets one unit per GPU of the pool, so that
# no more GPU jobs than GPUs run at once, and the jobs (which inherit this process's environment) learn
# the pool, from which each claims a GPU of its own. `--resources gpu=N` (given by the SLURM profile,
# where SLURM assigns the GPUs) turns this off, as does a pool of no GPUs (GPU jobs are not limited
# then: with `device: auto` they run on the CPU, with `device: cuda` each fails at its start).
if workflow.is_main_process and "gpu" not in workflow.global_resources:
    GPU_POOL = gpu_pool(config["gpus"])
    if GPU_POOL:
        workflow.register_resource("gpu", len(GPU_POOL))
        os.environ[POOL_VARIABLE] = ",".join(GPU_POOL)
        os.environ.setdefault(LOCK_DIR_VARIABLE, str(default_lock_dir()))

# `threads_per_job: auto` (pathmamba.core.gpus.threads_per_job): a local run splits its `--cores`, one kept
# for Snakemake, between the units of the `gpu` resource (the GPUs of the pool), so that every GPU has a
# job. The rules read the number from the config. A cluster run is refused at its start (onstart): the
# executor is not known yet while this file is read, and the cores of this host say nothing of the nodes'.
THREADS_PER_JOB_CONFIGURED = config["threads_per_job"]
if THREADS_PER_JOB_CONFIGURED == "auto":
    GPU_UNITS = workflow.global_resources["gpu"].value if "gpu" in workflow.global_resources else 0
    config["threads_per_job"] = threads_per_job("auto", workflow.cores, GPU_UNITS or 0)


wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    seed=r"\d+",


def run_files(name, pattern=EXPERIMENT_DIR):
    """``name`` in the folder ``pattern`` of every run of the grid."""
    return expand(f"{pattern}/{name}", dataset=DATASETS, method=METHODS, seed=SEEDS)


def dataset_root(wildcards):
    """The dataset's folder: the configured root, else the one generated or prepared under resources/."""
    entry = config["datasets"][wildcards.dataset]
    if "root" in entry:
        return entry["root"]
    return DATASET_DIR.format(dataset=wildcards.dataset)


def dataset_argument(wildcards):
    """What the commands' --dataset takes: a user's dataset's description file, else the shipped name."""
    return config["datasets"][wildcards.dataset].get("description", wildcards.dataset)


def dataset_description(wildcards):
    """A user's dataset's description file, as an input of the jobs that read it first (none for a
    shipped dataset): an edited description validates (and so trains and evaluates) again."""
    entry = config["datasets"][wildcards.dataset]
    return [entry["description"]] if "description" in entry else []


# Every training job waits for its dataset's validation report, so none starts on invalid data.
VALIDATION_REPORT = f"{RESULTS}/{layout.VALIDATION_REPORT}"


def pretrained_weights(wildcards, stage=None):
    """The weights files that the method's (or its first stage's) hparams name under
    <resources_dir>/weights/ (`pretrained`, `segmenter_pretrained`), as train inputs: the fetch_weights
    rule makes them. None for `none`, `imagenet` or other paths."""
    return fetched_weights(config, wildcards.method, stage)


def first_stage_outputs(wildcards):
    """What a two-stage method trains from: its first stage's model and pseudo masks; nothing for others."""
    if wildcards.method not in TWO_STAGE_METHODS:
        return {}
    return {
        "stage1_model": STAGE1_MODEL.format(**wildcards),
        "pseudo_masks": PSEUDO_MASKS.format(**wildcards),
    }


def first_stage_options(wildcards, input):
    """The train command's arguments naming :func:`first_stage_outputs` (none for one-stage methods);
    a list, for `{params.stage:q}`."""
    if wildcards.method not in TWO_STAGE_METHODS:
        return []
    return ["--stage1-model", input.stage1_model, "--pseudo-masks", input.pseudo_masks]


def job_device(wildcards, stage=None):
    """The `device` setting of a job of the method (its first stage's for `stage=1`)."""
    return train_settings(config, wildcards.method, stage).get("device", "auto")


def gpu_units(wildcards, stage=None):
    """The job's units of the `gpu` resource: one unless its device is the CPU or SLURM is asked for the
    GPU as a generic resource (`slurm.gpu_gres`: the executor plugin refuses a job asking both ways)."""
    return 0 if job_device(wildcards, stage) == "cpu" or config["slurm"]["gpu_gres"] else 1


def slurm_resources(kind, stage=None):
    """The SLURM-only resources that the config's `slurm` block gives the rules of a kind, "gpu" or "cpu"
    (its partition and, for GPU jobs not on the CPU, `slurm.gpu_gres`). Unset keys are left out, so that a
    profile's default-resources apply; a profile's set-resources win over these."""
    resources = {}
    if config["slurm"][f"{kind}_partition"]:
        resources["slurm_partition"] = config["slurm"][f"{kind}_partition"]
    if kind == "gpu" and config["slurm"]["gpu_gres"]:
        resources["gres"] = lambda wildcards: (
            "" if job_device(wildcards, stage) == "cpu" else config["slurm"]["gpu_gres"]
        )
    return resources


def gpu_runtime_minutes(gpu_hours, attempt):
    """A GPU job's SLURM time limit: its estimate with a margin, growing with the attempt, at most
    `slurm.max_runtime_hours`."""
    return runtime_minutes(gpu_hours, attempt, config["slurm"]["max_runtime_hours"])


def as_json(value):
    return json.dumps(value, sort_keys=True)


# --- datasets: which rule makes each one, and its validation settings (rules/data.smk) ---


def any_of(names):
    """A wildcard regex matching exactly these dataset names (nothing when there are none)."""
    return "|".join(names) or "(?!)"


def datasets_with(*keys):
    return [name for name, entry in config["datasets"].items() if any(key in entry for key in keys)]


def prepare_sources(wildcards):
    """The prepare rule's inputs: hand-downloaded archives, or the download rule's record."""
    entry = config["datasets"][wildcards.dataset]
    if "archive" in entry:
        return dataset_archives(entry)
    return f"{RESOURCES}/{layout.DOWNLOAD_RECORD}".format(dataset=wildcards.dataset)


def source_arguments(wildcards, input):
    """The prepare command's arguments naming its sources; a list, for `{params.sources:q}`."""
    entry = config["datasets"][wildcards.dataset]
    if "archive" in entry:
        return ["--archive", *input]
    return ["--downloaded", input[0]]


def validation_option(wildcards, key):
    """A validation setting of the dataset: configured, else the default (a synthetic dataset's size)."""
    entry = config["datasets"][wildcards.dataset]
    defaults = {"image_size": entry.get("synthetic", {}).get("size", 224), "counts": "error"}
    return entry.get("validate", {}).get(key, defaults[key])


# `forkserver: true` (the demo): a local CPU run's jobs fork from one process that imported torch and the
# project once, instead of each importing them (pathmamba/forkserver.py). Not for cluster jobs (other
# hosts) nor conda or container jobs (another Python): a job the server cannot run starts normally. Not
# for GPU jobs (minutes each: nothing to gain) nor more than one thread per job (a process with threads
# must not fork).
FORKSERVER = []


def forkserver_off_reason():
    """Why a run with `forkserver: true` starts no server, or None when it starts one."""
    if workflow.executor_plugin.common_settings.non_local_exec:
        return "jobs run on other hosts"
    if workflow.deployment_settings.deployment_method:
        return "jobs run in conda environments or containers, another Python"
    if config["threads_per_job"] != 1:
        return f"threads_per_job is {config['threads_per_job']}; the server is for jobs of one thread"
    stages = [(method, None) for method in METHODS] + [(method, 1) for method in TWO_STAGE_METHODS]
    devices = {train_settings(config, method, stage).get("device", "auto") for method, stage in stages}
    if devices != {"cpu"}:
        return f"jobs run on device {', '.join(sorted(devices))}; the server is for CPU jobs"
    return None


# The experiment lock of the results folder (pathmamba/core/locks.py), held from the start of the jobs to the end of
# this process: a second Snakemake in another working folder whose config names the same results folder
# is refused before it deletes anything. Snakemake's own lock covers only its working folder.
EXPERIMENT_LOCK = []


onstart:
    from snakemake.logging import logger
    from pathmamba.core.locks import ExperimentFolderBusy, lock_experiment_folder

    if THREADS_PER_JOB_CONFIGURED == "auto" and workflow.executor_plugin.common_settings.non_local_exec:
        raise WorkflowError(
            "threads_per_job: auto splits the cores of this machine between its GPUs, for a local run; a "
            "cluster run needs a number, the CPUs each job asks for: e.g. --config threads_per_job=8"
        )
    try:
        handle, note = lock_experiment_folder(Path(RESULTS), Path.cwd())
    except ExperimentFolderBusy as error:
        raise WorkflowError(str(error)) from None
    if handle is not None:
        EXPERIMENT_LOCK.append(handle)
    if note:
        logger.warning(note)
    if config["forkserver"]:
        reason = forkserver_off_reason()
        if reason:
            logger.info(f"forkserver: true, but no fork server: {reason}")
        else:
            from pathmamba.forkserver import SOCKET_VARIABLE, job_environment, start_for_jobs

            server = start_for_jobs(
                Path(RESULTS) / layout.FORKSERVER_LOG, job_environment(1, REPO), logger.warning
            )
            if server is not None:
                FORKSERVER.append(server)
                os.environ[SOCKET_VARIABLE] = str(server.socket_path)
                logger.info(
                    f"fork server for the jobs: pid {server.process.pid}, socket {server.socket_path}, "
                    f"log {RESULTS}/{layout.FORKSERVER_LOG}"
                )


def end_of_run():
    """Stop the fork server and release the experiment lock (if Snakemake is killed, the server notices and ends
    by itself, and the kernel releases the lock)."""
    from pathmamba.core.locks import release_experiment_folder

    for server in FORKSERVER:
        server.stop()
    for handle in EXPERIMENT_LOCK:
        release_experiment_folder(handle)


onsuccess:
    end_of_run()


onerror:
    end_of_run()


# --- tables and figures of the run (aggregate.smk) --------------------------------------------------

TABLES = f"{RESULTS}/{layout.TABLES}"
FIGURES = f"{RESULTS}/{layout.FIGURES}"


def table(stem, extension):
    """A table file of the run (its name: pathmamba/core/layout.py)."""
    return f"{TABLES}/{layout.table_file(stem, extension)}"


def figure(stem, extension=layout.FIGURE_FORMATS[0]):
    """A figure file of the run (its stem: pathmamba/core/layout.py)."""
    return f"{FIGURES}/{stem}.{extension}"


def dataset_figure(name, dataset):
    return figure(layout.DATASET_FIGURES[name].format(dataset=dataset))
