"""Checks of a workflow config beyond its JSON schema, and the resolution of per-method settings.

The schema (``workflow/schemas/config.schema.yaml``) checks types and ranges; these checks need the
registries and the file system. Every message names the key, the value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pathmamba.data.specs import dataset_names, get_dataset_spec
from pathmamba.registry import get_spec, method_names, two_stage_methods


class ConfigError(ValueError):
    """A config value that the workflow cannot run with."""


def check_config(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` listing every problem found in ``config``."""
    problems = []
    for method, entry in config.get("methods", {}).items():
        if method not in method_names():
            problems.append(f"methods.{method}: unknown method; registered methods: {', '.join(method_names())}")
        elif "stage1" in entry and method not in two_stage_methods():
            problems.append(f"methods.{method}.stage1: {method} has no first stage; methods with one: "
                            f"{', '.join(two_stage_methods())}")
        else:
            problems += preset_overrides(method, entry)
    for key in ("methods", "datasets"):
        for name in config.get("grid", {}).get(key, []):
            if name not in config.get(key, {}):
                problems.append(f"grid.{key}: {name!r} is not configured under {key}: ({', '.join(config.get(key, {}))})")
    for name, entry in config.get("datasets", {}).items():
        if name not in dataset_names():
            problems.append(f"datasets.{name}: unknown dataset; known datasets: {', '.join(dataset_names())}")
            continue
        spec = get_dataset_spec(name)
        if "synthetic" in entry and not spec.synthetic:
            problems.append(f"datasets.{name}.synthetic: only synthetic datasets are generated "
                            f"(synthetic-luad, synthetic-bcss); give 'root' for {name}")
        if "root" in entry and not Path(entry["root"]).is_dir():
            problems.append(f"datasets.{name}.root: {entry['root']!r} is not a directory; expected the "
                            "extracted dataset folder holding training/, val/ and test/")
        if "source" in entry and spec.gdrive_folder is None:
            problems.append(f"datasets.{name}.source: {name} has no published Google Drive folder; "
                            "give 'archive', 'url' or 'root'")
        for archive in dataset_archives(entry):
            if not Path(archive).is_file():
                problems.append(f"datasets.{name}.archive: {archive!r} is not a file; expected a zip "
                                "archive of the dataset")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def preset_overrides(method: str, entry: dict[str, Any]) -> list[str]:
    """One problem per hparams key of ``method``'s config block (and of its ``stage1`` block) that its
    registry preset fixes. A preset is what makes the method that variant (PathMamba's Table 2 flags): a
    config that set ``use_miml: true`` under ``pathmamba-b`` would train another row under that name."""
    problems = []
    for stage, block in ((None, entry), (1, entry.get("stage1") or {})):
        if stage == 1 and not block:
            continue
        preset = get_spec(method, stage).preset
        prefix = f"methods.{method}" + (".stage1" if stage else "")
        for key in sorted(set(block.get("hparams") or {}) & set(preset)):
            problems.append(f"{prefix}.hparams.{key}: {method}'s registry preset fixes {key}={preset[key]!r}; "
                            "a preset key cannot be set by config (remove it, or register another method)")
    return problems


def grid_methods(config: dict[str, Any]) -> list[str]:
    """The methods a run trains: ``grid.methods`` when given, else every configured method."""
    return list(config.get("grid", {}).get("methods") or config["methods"])


def grid_datasets(config: dict[str, Any]) -> list[str]:
    """The datasets a run uses: ``grid.datasets`` when given, else every configured dataset."""
    return list(config.get("grid", {}).get("datasets") or config["datasets"])


def dataset_archives(entry: dict[str, Any]) -> list[str]:
    """The hand-downloaded archives of a dataset entry: ``archive`` as a list (empty when not given)."""
    archive = entry.get("archive", [])
    return [archive] if isinstance(archive, str) else list(archive)


def _method_block(config: dict[str, Any], method: str, stage: int | None) -> dict[str, Any]:
    """The config block of ``method`` (``stage=1``: its ``stage1`` block, empty when not given)."""
    entry = config["methods"][method]
    return entry.get("stage1", {}) if stage == 1 else entry


def train_settings(config: dict[str, Any], method: str, stage: int | None = None) -> dict[str, Any]:
    """The training settings of ``method`` (``stage=1``: of its first stage): the global ``train`` block,
    then the method's (or stage's) overrides."""
    return {**config.get("train", {}), **_method_block(config, method, stage).get("train", {})}


#: Builder keywords naming a weights file to initialise from.
WEIGHT_KEYS = ("pretrained", "segmenter_pretrained")


def without_weights_files(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with every :data:`WEIGHT_KEYS` entry set to ``none``: the model built with random
    initial weights (its trained weights loaded over them, or its speed measured)."""
    return {key: "none" if key in WEIGHT_KEYS else value for key, value in hparams.items()}


def method_hparams(config: dict[str, Any], method: str, stage: int | None = None) -> dict[str, Any]:
    """The builder keywords of ``method`` (``stage=1``: of its first stage)."""
    return dict(_method_block(config, method, stage).get("hparams", {}))


def fetched_weights(config: dict[str, Any], method: str, stage: int | None = None) -> list[str]:
    """The weights files under ``<resources_dir>/weights/`` that ``method``'s (``stage=1``: its first
    stage's) hparams name (``pretrained``, ``segmenter_pretrained``): what the fetch_weights rule writes."""
    prefix = f"{config['resources_dir']}/weights/"
    return [value for value in method_hparams(config, method, stage).values()
            if isinstance(value, str) and value.startswith(prefix)]


def all_fetched_weights(config: dict[str, Any]) -> list[str]:
    """:func:`fetched_weights` of every configured method and first stage, sorted, each once."""
    return sorted({path for method in grid_methods(config)
                   for stage in ((None, 1) if method in two_stage_methods() else (None,))
                   for path in fetched_weights(config, method, stage)})
