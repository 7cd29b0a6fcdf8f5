"""No config value or path is ever read by a shell: the rules quote everything they put in a command.

Paths and strings below hold a space, an apostrophe, a non-ASCII letter and shell syntax (``$(...)``,
backticks, ``;``) that would create a file named ``INJECTED`` if a shell ever interpreted it."""

import csv
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from conftest import REPO
from test_workflow import run_snakemake

from pathmamba.data.synthetic import make_synthetic_dataset

MARKER = "INJECTED"
# One path component: every character of it must reach the command as it is, inside one argument.
ODD = f"a b'c-ü $(touch {MARKER})`touch {MARKER}`;touch {MARKER} $HOME"
RESULTS_DIR = "res ult's-ü"
RULES = REPO / "workflow" / "rules"
# Options whose argument is a path (one each; --archive: one or more).
PATH_OPTIONS = {"--data-root", "--out", "--model", "--masks-dir", "--checkpoint-dir", "--folder", "--record",
                "--lock", "--archive", "--downloaded", "--stage1-model", "--pseudo-masks", "--experiment-dir",
                "--out-dir", "--paper", "--validated"}


def shell_rules() -> set[str]:
    """Every rule of workflow/rules/ (those of `use rule ... as` too): all of them run shell commands."""
    text = "\n".join(path.read_text() for path in sorted(RULES.glob("*.smk")))
    return set(re.findall(r"^rule (\w+):", text, flags=re.MULTILINE)) | set(
        re.findall(r"^use rule \w+ as (\w+)", text, flags=re.MULTILINE))


def printed_commands(output: str) -> list[tuple[str, str]]:
    """(rule, shell command) of every job of a `--dry-run --printshellcmds` output."""
    jobs = []
    for block in output.split("\nrule ")[1:]:
        rule = block.split(":", 1)[0]
        commands = re.findall(r"^Shell command: (.*)$", block, flags=re.MULTILINE)
        if commands and commands != ["None"]:  # rule all has none
            assert len(commands) == 1, block
            jobs.append((rule, commands[0]))
    return jobs


def options(arguments: list[str]) -> dict[str, list[str]]:
    """Option -> its arguments, for a command line of `--option value...` pairs."""
    found: dict[str, list[str]] = {}
    current = None
    for argument in arguments:
        if argument.startswith("--"):
            current = found.setdefault(argument, [])
        else:
            assert current is not None, arguments
            current.append(argument)
    return found


def dry_run_config(tmp_path: Path, sources: str) -> dict:
    """Every rule's inputs from a config full of odd paths: a generated dataset under an odd
    resources_dir, and the real datasets from an odd root and URL ("root-url") or odd archives and the
    Google Drive folder ("archive-gdrive"); weights from an odd mirror; an odd string in the hparams."""
    if sources == "root-url":
        root = tmp_path / f"data {ODD}"
        root.mkdir()
        real = {"luad-histoseg": {"root": str(root)}, "bcss-wsss": {"url": f"https://example.org/{ODD}.zip"}}
    else:
        archives = [tmp_path / f"part{i} {ODD}.zip" for i in (1, 2)]
        for archive in archives:
            archive.write_bytes(b"")
        real = {"luad-histoseg": {"archive": [str(archive) for archive in archives]}, "bcss-wsss": {"source": "gdrive"}}
    resources = f"rsc {ODD}"
    return {
        "experiment": "odd",
        "results_dir": f"{RESULTS_DIR} {ODD}",
        "resources_dir": resources,
        "seeds": [0],
        "weights_urls": {"resnet18": f"file:///mirror/{ODD}.pth"},
        "datasets": {"synthetic-luad": {"synthetic": {"n_train": 8, "n_val": 4, "n_test": 2, "size": 32, "seed": 0}},
                     **real},
        "train": {"epochs": 1, "device": "cpu"},
        "methods": {
            # The weights path carries the odd characters into --hparams (an unknown key is refused now).
            "cam": {"hparams": {"backbone": "resnet18", "pretrained": f"{resources}/weights/resnet18-imagenet.pth"}},
            "wsss-tissue": {"stage1": {"hparams": {"backbone": "resnet18", "pretrained": "none"}},
                            "hparams": {"segmenter_encoder": "tu-lcnet_050"}},
        },
    }


def check_command(rule: str, command: str, config: dict) -> None:
    """The command splits into the arguments that the config asks for, each odd value whole."""
    arguments = shlex.split(command)
    assert arguments[:4] == ["python", "-m", "pathmamba", rule.replace("_stage1", "").replace("_", "-")], command
    assert arguments[-3] == ">" and arguments[-1] == "2>&1", command
    log = arguments[-2]
    assert log.startswith((config["results_dir"] + "/", config["resources_dir"] + "/")) and log.endswith(".log")
    given = options(arguments[4:-3])
    json_arguments = given.get("--hparams", []) + given.get("--settings", [])  # read back below
    for argument in arguments:
        if MARKER in argument and argument not in json_arguments:
            assert ODD in argument, (argument, command)
    for option, values in given.items():
        if option in PATH_OPTIONS and option != "--archive" and not (rule == "figures" and option == "--data-root"):
            assert len(values) == 1, (option, command)

    datasets = config["datasets"]
    if "--dataset" in given:
        dataset = given["--dataset"][0]
        assert dataset in datasets
    if rule in ("validate_dataset", "evaluate_trivial", "train", "train_stage1", "pseudo_masks", "evaluate"):
        dataset = dataset if "--dataset" in given else re.search(r"/runs/([\w-]+)/", given["--model"][0])[1]
        expected = datasets[dataset].get("root", f"{config['resources_dir']}/datasets/{dataset}")
        assert given["--data-root"] == [expected], command
    if rule in ("train", "train_stage1", "evaluate", "evaluate_trivial", "pseudo_masks"):
        assert given["--validated"] == [f"{config['results_dir']}/odd/datasets/{dataset}/validation.json"], command
    if rule in ("train", "train_stage1"):
        method = given["--method"][0]
        block = config["methods"][method].get("stage1", {}) if rule == "train_stage1" else config["methods"][method]
        assert json.loads(given["--hparams"][0]) == block.get("hparams", {})
        assert json.loads(given["--settings"][0]) == config["train"]
        if rule == "train_stage1":
            assert given["--stage"] == ["1"]
        elif method == "wsss-tissue":
            assert given["--stage1-model"][0].endswith("/stage1/model.pt")
            assert given["--pseudo-masks"][0].endswith("/pseudo_masks")
    if rule == "fetch_weights":
        assert given["--url"] == [config["weights_urls"]["resnet18"]]
    if rule == "download_dataset":
        assert given.get("--url", []) == ([datasets[dataset]["url"]] if "url" in datasets[dataset] else [])
    if rule == "prepare_dataset":
        if "archive" in datasets[dataset]:
            assert given["--archive"] == datasets[dataset]["archive"]
        else:
            assert given["--downloaded"] == [f"{config['resources_dir']}/downloads/{dataset}.json"]
    if rule in ("tables", "figures"):
        # (In the order of config.yaml, which has its keys sorted.)
        assert given["--datasets"] == sorted(datasets) and given["--methods"] == sorted(config["methods"])
        assert given["--seeds"] == ["0"] and given["--experiment-dir"] == [f"{config['results_dir']}/odd"]
    if rule == "figures":
        assert given["--data-root"] == [
            f"{name}={entry.get('root', config['resources_dir'] + '/datasets/' + name)}"
            for name, entry in sorted(datasets.items())]


def test_every_shell_command_keeps_odd_values_as_whole_arguments(tmp_path, snakemake_bin, workflow_env):
    seen = set()
    for sources in ("root-url", "archive-gdrive"):
        work = tmp_path / sources
        work.mkdir()
        config = dry_run_config(work, sources)
        result = run_snakemake(snakemake_bin, workflow_env, work, config, "--dry-run", "--printshellcmds")
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
        jobs = printed_commands(result.stdout + result.stderr)
        for rule, command in jobs:
            check_command(rule, command, config)
        seen |= {rule for rule, _ in jobs}
        assert not [path for path in tmp_path.rglob(MARKER)]
    assert seen == shell_rules()


@pytest.mark.parametrize(
    "key, path, expected",
    [("results_dir", "res{x}", "results_dir: 'res{x}' contains '{', '}'"),
     ("resources_dir", "a\nb", "resources_dir: 'a\\nb' contains a line break"),
     ("resources_dir", "-rsc", "resources_dir: '-rsc' starts with '-'"),
     ("root", "", "datasets.luad-histoseg.root: the path is empty")],
    ids=["braces", "line-break", "leading-dash", "empty"],
)
def test_unusable_configured_paths_fail_at_start_up(tmp_path, snakemake_bin, workflow_env, key, path, expected):
    config = {"experiment": "odd", "seeds": [0], "train": {"epochs": 1}, "methods": {"cam": {}},
              "datasets": {"synthetic-luad": {"synthetic": {"n_train": 8, "n_val": 4, "n_test": 2, "size": 32,
                                                            "seed": 0}}}}
    if key == "root":
        config["datasets"]["luad-histoseg"] = {"root": path}
    else:
        config[key] = path
    result = run_snakemake(snakemake_bin, workflow_env, tmp_path, config, "--dry-run")
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


def test_a_checkout_in_an_odd_folder_runs_its_jobs(tmp_path, snakemake_bin, workflow_env):
    """The shell prefix puts the checkout on PYTHONPATH, quoted: a job runs from a checkout whose folder has
    a space, an apostrophe and a non-ASCII letter (and imports pathmamba from it, not from elsewhere)."""
    checkout = tmp_path / f"check out's-ü {ODD}"
    for folder in ("workflow", "pathmamba", "baselines", "config"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    config = {"experiment": "odd", "seeds": [0], "train": {"epochs": 1}, "methods": {"cam": {}},
              "datasets": {"synthetic-luad": {"synthetic": {"n_train": 4, "n_val": 2, "n_test": 1, "size": 32,
                                                            "seed": 0}}}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    env = {name: value for name, value in workflow_env.items() if name != "PYTHONPATH"}
    result = subprocess.run(
        [snakemake_bin, "--snakefile", str(checkout / "workflow" / "Snakefile"), "--directory", str(work),
         "--configfile", str(work / "config.yaml"), "--cores", "1", "resources/datasets/synthetic-luad"],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((work / "resources/datasets/synthetic-luad/training").glob("*.png"))) == 4
    assert not list(tmp_path.rglob(MARKER))


@pytest.mark.e2e
def test_pipeline_runs_with_odd_paths_and_no_shell_injection(tmp_path, snakemake_bin, workflow_env):
    """results_dir with a space, an apostrophe and a non-ASCII letter; a dataset root, the resources
    folder and a pretrained weights file (a string hparam, in the --hparams JSON) named with shell syntax."""
    work = tmp_path / "work"
    work.mkdir()
    root = tmp_path / f"data {ODD}"
    make_synthetic_dataset("synthetic-luad", root, n_train=16, n_val=4, n_test=4, size=32, seed=0)
    weights = tmp_path / f"weights {ODD}" / f"resnet18 x'{ODD}'y.pth"
    weights.parent.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    config = {
        "experiment": "odd",
        "results_dir": RESULTS_DIR,
        "resources_dir": f"rsc {ODD}",
        "seeds": [0],
        "threads_per_job": 1,
        "datasets": {
            "synthetic-luad": {"synthetic": {"n_train": 16, "n_val": 4, "n_test": 4, "size": 32, "seed": 1}},
            # The real layout's twin, used in place from the odd root.
            "luad-histoseg": {"root": str(root), "validate": {"image_size": 32, "counts": "warn"}},
        },
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu", "workers": 0},
        "evaluate": {"n_masks": 1},
        "report": {"n_resamples": 100, "n_images": 1},
        "methods": {
            "cam": {"hparams": {"backbone": "resnet18", "pretrained": str(weights)}},
            "wsss-tissue": {
                "stage1": {"hparams": {"backbone": "resnet18", "width": 8, "pretrained": "none"}},
                "hparams": {"segmenter_encoder": "tu-lcnet_050", "decoder_channels": 8},
            },
        },
    }
    result = run_snakemake(snakemake_bin, workflow_env, work, config, "all")
    assert result.returncode == 0, result.stderr[-4000:]

    # Nothing beside the configured folders: no word of a split path became a file or folder.
    assert {path.name for path in work.iterdir()} == {"config.yaml", ".snakemake", RESULTS_DIR, f"rsc {ODD}"}
    assert not list(tmp_path.rglob(MARKER)), "a shell ran a command from the config"
    results = work / RESULTS_DIR / "odd"
    assert (work / f"rsc {ODD}" / "datasets" / "synthetic-luad" / "test").is_dir()
    with open(results / "tables" / "comparison.csv") as handle:
        cells = {(row["dataset"], row["method"]) for row in csv.DictReader(handle)}
    assert cells == {(d, m) for d in config["datasets"] for m in (*config["methods"], "trivial")}
    for dataset in config["datasets"]:
        for method in config["methods"]:
            assert (results / "runs" / dataset / method / "seed0" / "test_metrics.json").is_file()
        assert (results / "figures" / f"qualitative_{dataset}.png").stat().st_size > 1000
    assert (results / "runs" / "luad-histoseg" / "wsss-tissue" / "seed0" / "stage1" / "model.pt").is_file()
    # The weights file was loaded: the hparam reached the job intact.
    assert str(weights) in (results / "logs" / "luad-histoseg" / "cam" / "seed0" / "train.log").read_text()

    jobs = {"cam": ["train", "evaluate"], "wsss-tissue": ["train_stage1", "pseudo_masks", "train", "evaluate"]}
    expected = {"data/synthetic-luad.log", "tables.log", "figures.log"} | {
        f"{dataset}/{method}/seed0/{job}.log" for dataset in config["datasets"] for method in jobs
        for job in jobs[method]}
    for dataset in config["datasets"]:
        expected |= {f"data/{dataset}.validate.log", f"{dataset}/trivial.log"}
    logs = {path.relative_to(results / "logs").as_posix(): path for path in (results / "logs").rglob("*.log")}
    assert set(logs) == expected
    # Every job logs what it did (tables and figures log only warnings and errors).
    assert not [name for name, path in logs.items()
                if path.stat().st_size == 0 and name not in ("tables.log", "figures.log")]
