"""The layout of a run's outputs, ``<results_dir>/<run>/``: the one place that names its folders.

The workflow's rules build their file patterns from these (``workflow/rules/common.smk``), and the
package finds runs with :func:`run_path`; nothing else spells a results path. Patterns are relative
to the run folder and hold ``{dataset}``, ``{method}`` and ``{seed}`` to fill. Imports nothing heavy:
the Snakefile reads it at start-up.
"""

from __future__ import annotations

from pathlib import Path

#: The trivial reference's method name: one run per dataset, without a seed.
TRIVIAL = "trivial"

#: One training run: model.pt, run.json, history.csv, test_metrics.json, per_image.csv, masks/.
RUN = "runs/{dataset}/{method}/seed{seed}"
#: The trivial reference's scores (test_metrics.json, per_image.csv).
TRIVIAL_RUN = "runs/{dataset}/" + TRIVIAL
#: A run's logs, one file per job.
LOGS = "logs/{dataset}/{method}/seed{seed}"
#: A dataset's logs: ``<DATASET_LOGS>.log`` (generation or download), ``.download.log``, ``.prepare.log``,
#: ``.validate.log``.
DATASET_LOGS = "logs/data/{dataset}"
TRIVIAL_LOG = "logs/{dataset}/trivial.log"
#: The tables' and figures' logs (tables.log, figures.log).
REPORT_LOGS = "logs"
#: A training job's resumable checkpoints; removed when the run finishes.
CHECKPOINTS = "checkpoints/{dataset}/{method}/seed{seed}"
BENCHMARK_ROOT = "benchmarks"
#: Snakemake's benchmark files of a run's jobs (train.tsv, evaluate.tsv, ...).
BENCHMARKS = BENCHMARK_ROOT + "/{dataset}/{method}/seed{seed}"
#: The dataset's validation report, which every training job waits for.
VALIDATION_REPORT = "datasets/{dataset}/validation.json"
#: The log of a local run's fork server (pathmamba/forkserver.py), which runs no rule of its own.
FORKSERVER_LOG = "logs/forkserver.log"
TABLES = "tables"
FIGURES = "figures"


def run_path(run_dir: Path, dataset: str, method: str, seed: int | None) -> Path:
    """Folder of one run under the run folder ``run_dir``; the trivial reference has no seed."""
    if seed is None:
        return Path(run_dir) / TRIVIAL_RUN.format(dataset=dataset)
    return Path(run_dir) / RUN.format(dataset=dataset, method=method, seed=seed)


def run_dir_of_table(table_file: str | Path) -> Path:
    """The run folder whose :data:`TABLES` folder holds ``table_file``."""
    return Path(table_file).parent.parent


def run_dir_of(run_file: str | Path) -> Path:
    """The run folder that holds ``run_file``, a file directly inside one run's folder (:data:`RUN`)."""
    return Path(run_file).parents[len(Path(RUN).parts)]


def benchmark_path(run_dir: Path, dataset: str, method: str, seed: int) -> Path:
    """Folder of one run's benchmark files under the run folder ``run_dir``."""
    return Path(run_dir) / BENCHMARKS.format(dataset=dataset, method=method, seed=seed)
