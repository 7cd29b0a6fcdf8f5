"""The layout of an experiment's outputs, ``<results_dir>/<experiment>/``, and of ``<resources_dir>/``: the one
place that names their folders and files, tables and figures included.

Two words, one meaning each: an *experiment* is one config's grid (its ``experiment`` key names the folder
``<results_dir>/<experiment>``, which holds the tables, figures and logs); a *run* is one training run
of it, a dataset, method and seed, in the folder :data:`RUN` with its ``run.json``.

The workflow's rules build their file patterns from these (``workflow/rules/*.smk``), and the package
finds and writes results with them; nothing else spells a results or resources path
(``tests/test_layout.py`` greps the package and the rules for one). Patterns are relative to the
experiment folder (or the resources folder) and hold ``{dataset}``, ``{method}``, ``{seed}`` (or ``{backbone}``,
``{device_type}``) to fill. Imports nothing heavy: the Snakefile reads it at start-up.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout (or installed source tree) whose ``config/`` and ``workflow/`` the package reads.
REPO = Path(__file__).resolve().parents[2]

#: The trivial reference's method name: one run per dataset, without a seed.
TRIVIAL = "trivial"

#: One training run: model.pt, run.json, history.csv, test_metrics.json, per_image.csv, masks/.
RUN = "runs/{dataset}/{method}/seed{seed}"
#: The trivial reference's scores (test_metrics.json, per_image.csv).
TRIVIAL_RUN = "runs/{dataset}/" + TRIVIAL
#: A run's logs, one file per job: :data:`JOB_LOG`.
LOGS = "logs/{dataset}/{method}/seed{seed}"
#: A job's log, named after its rule (in LOGS; the tables' and figures' in REPORT_LOGS).
JOB_LOG = "{job}.log"
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
#: The HTML report that ``snakemake --report`` writes of an experiment.
REPORT = "report.html"

# The files of one run's folder (RUN): training writes the first three, evaluation the rest.
MODEL = "model.pt"
HISTORY = "history.csv"
RUN_RECORD = "run.json"
TEST_METRICS = "test_metrics.json"
PER_IMAGE = "per_image.csv"
MASKS = "masks"
#: A two-stage method's first stage: a folder of the run holding its own MODEL, HISTORY and RUN_RECORD.
STAGE1 = "stage1"
#: The first stage's pseudo masks of every training image: a folder of the run.
PSEUDO_MASKS = "pseudo_masks"
#: Snakemake's benchmark file of each job of a run (in BENCHMARKS), by rule.
BENCHMARK_FILES = {"train_stage1": "train_stage1.tsv", "pseudo_masks": "pseudo_masks.tsv", "train": "train.tsv",
                   "evaluate": "evaluate.tsv"}

# <resources_dir>/: what the workflow makes once and every run shares.
#: A generated or prepared dataset (a configured ``root`` replaces it).
DATASET = "datasets/{dataset}"
#: A downloaded dataset's files (kept: partial files resume) and the record of the download.
DOWNLOADS = "downloads/{dataset}"
DOWNLOAD_RECORD = DOWNLOADS + ".json"
#: The SHA-256 sums of a dataset's sources, written on the first verified preparation.
CHECKSUMS = "checksums/{dataset}.json"
#: ImageNet weights of a ResNet backbone; ``WEIGHTS_FOLDER`` is what a method's ``pretrained`` names.
WEIGHTS_FOLDER = "weights"
WEIGHTS = WEIGHTS_FOLDER + "/{backbone}-imagenet.pth"
WEIGHTS_LOG = WEIGHTS_FOLDER + "/{backbone}-imagenet.log"
#: The throughput that ``calibrate`` measured on one device type (cpu, cuda).
THROUGHPUT = "throughput-{device_type}.json"

# The tables (in TABLES), each written in the formats named here, and the figures (in FIGURES), each as
# PNG and PDF: file stems.
TABLE1 = "table1_comparison"
TABLE2 = "table2_ablation"
PER_CLASS_TABLE = "per_class_iou"
SENSITIVITY_TABLE = "sensitivity_with_background"
STATISTICS_TABLE = "statistics"
COMPARISON_TABLE = "comparison"
TABLE_FORMATS = {TABLE1: ("csv", "html", "md", "tex"), TABLE2: ("csv", "html", "md", "tex"),
                 PER_CLASS_TABLE: ("csv", "html", "md"), SENSITIVITY_TABLE: ("csv", "html", "md"),
                 STATISTICS_TABLE: ("csv", "html", "md"), COMPARISON_TABLE: ("csv", "md")}
#: One figure per dataset each.
DATASET_FIGURES = {"qualitative": "qualitative_{dataset}", "heatmaps": "heatmaps_{dataset}",
                   "confusion": "confusion_{dataset}"}
#: One figure per run each.
RUN_FIGURES = {"seed_spread": "miou_over_seeds", "ablation": "ablation", "per_class": "per_class_iou",
               "training_curves": "training_curves", "compute_cost": "compute_cost"}
FIGURE_FORMATS = ("png", "pdf")


def weights_backbone(resources_dir: str, path: str) -> str | None:
    """The backbone whose :data:`WEIGHTS` file under ``resources_dir`` is ``path`` (both as the config spells
    them), else None."""
    before, _, after = WEIGHTS.partition("{backbone}")
    head = f"{resources_dir}/{before}"
    if path.startswith(head) and path.endswith(after) and len(path) > len(head) + len(after):
        return path[len(head):-len(after)]
    return None


def table_file(stem: str, extension: str) -> str:
    """A table's file name in :data:`TABLES`, e.g. ``table_file(TABLE1, "md")``."""
    if extension not in TABLE_FORMATS[stem]:
        raise ValueError(f"table {stem} is written as {', '.join(TABLE_FORMATS[stem])}, not {extension}")
    return f"{stem}.{extension}"


def figure_stems(datasets: list[str]) -> list[str]:
    """The file stems of every figure of an experiment over ``datasets`` (in :data:`FIGURES`): per dataset
    :data:`DATASET_FIGURES`, then :data:`RUN_FIGURES`."""
    return [*(stem.format(dataset=dataset) for dataset in datasets for stem in DATASET_FIGURES.values()),
            *RUN_FIGURES.values()]


def configured_experiment_dir(results_dir: str | Path, experiment: str) -> Path:
    """A config's experiment folder, ``<results_dir>/<experiment>``: the patterns above are relative to it."""
    return Path(results_dir) / experiment


def run_path(experiment_dir: Path, dataset: str, method: str, seed: int | None) -> Path:
    """Folder of one run under the experiment folder ``experiment_dir``; the trivial reference has no seed."""
    if seed is None:
        return Path(experiment_dir) / TRIVIAL_RUN.format(dataset=dataset)
    return Path(experiment_dir) / RUN.format(dataset=dataset, method=method, seed=seed)


def experiment_dir_of_table(table_file: str | Path) -> Path:
    """The experiment folder whose :data:`TABLES` folder holds ``table_file``."""
    return Path(table_file).parent.parent


def experiment_dir_of(run_file: str | Path) -> Path:
    """The experiment folder that holds ``run_file``, a file directly inside one run's folder (:data:`RUN`)."""
    return Path(run_file).parents[len(Path(RUN).parts)]


def benchmark_path(experiment_dir: Path, dataset: str, method: str, seed: int) -> Path:
    """Folder of one run's benchmark files under the experiment folder ``experiment_dir``."""
    return Path(experiment_dir) / BENCHMARKS.format(dataset=dataset, method=method, seed=seed)
