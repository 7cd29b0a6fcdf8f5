import json
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("8.0")

# The rules call `python -m pathmamba`; this makes the checkout importable without installing it,
# also inside conda environments and cluster jobs (which evaluate this file again).
REPO = str(Path(workflow.basedir).parent)
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))

from pathmamba.config import ConfigError, check_config, method_hparams, train_settings

validate(config, "../schemas/config.schema.yaml")
try:
    check_config(config)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

RESULTS = f"{config['results_dir']}/{config['run']}"
RESOURCES = config["resources_dir"]
DATASETS = list(config["datasets"])
METHODS = list(config["methods"])
SEEDS = [int(seed) for seed in config["seeds"]]
RUN_DIR = f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}"
LOG_DIR = f"{RESULTS}/logs/{{dataset}}/{{method}}/seed{{seed}}"


wildcard_constraints:
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    seed=r"\d+",


def dataset_root(wildcards):
    """The dataset's folder: generated for synthetic datasets, the configured root otherwise."""
    entry = config["datasets"][wildcards.dataset]
    if "synthetic" in entry:
        return f"{RESOURCES}/datasets/{wildcards.dataset}"
    return entry["root"]


def as_json(value):
    return json.dumps(value, sort_keys=True)
