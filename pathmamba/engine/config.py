"""Checks of a workflow config beyond its JSON schema, and the resolution of per-method settings.

The schema (``workflow/schemas/config.schema.yaml``) checks types and ranges; these checks need the
registries and the file system. Every message names the key, the value and what is allowed.

A method's ``hparams`` are checked against its builder's keywords, read from the builder's source
(:mod:`ast`, so that the start-up check imports neither torch nor the models): an unknown keyword (with
the nearest known one), a value that is not of the type its annotation says, a width or size below 1.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pathmamba.core.layout import REPO, WEIGHTS_FOLDER
from pathmamba.data.specs import DatasetSpec, DescriptionError, dataset_names, get_dataset_spec
from pathmamba.engine.registry import get_spec, method_names, training_stages, two_stage_methods

#: The largest seed: numpy's and torch's seeding take 32-bit unsigned integers.
MAX_SEED = 2**32 - 1
#: The workflow config's JSON schema: types, ranges and defaults.
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value that the workflow cannot run with."""


class ConfigFileError(ConfigError):
    """A config file that is not a YAML mapping with unique keys; the message names the file (and the line
    and column)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping, which it would let the last win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are meant to be overridden
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping (first on line {first_lines[key]}); "
                    "the second would silently replace the first: remove one", key_node.start_mark)
            first_lines.setdefault(key, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> Any:
    """The YAML file at ``path``, read with :class:`_UniqueKeyLoader`; a syntax error or a duplicate key
    raises :class:`ConfigFileError` naming the file, line and column."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigFileError(f"{path}{where}: {problem}; expected YAML (spaces, not tabs, for indentation)"
                              if r"\t" in problem else f"{path}{where}: {problem}") from None


def load_config_mapping(path: Path) -> dict[str, Any]:
    """The workflow config file at ``path`` (:func:`load_yaml`), refused unless it is a mapping of keys."""
    config = load_yaml(path)
    if not isinstance(config, dict):
        found = "an empty file" if config is None else f"a {type(config).__name__}"
        raise ConfigFileError(f"{path}: {found}; expected a mapping of config keys (experiment, seeds, datasets, "
                              "methods, train, ...), config/README.md")
    try:
        check_renamed_keys(config)
    except ConfigError as error:
        raise ConfigFileError(f"{path}: {error}") from None
    return config


#: Top-level config keys renamed: the old name -> the new one and what it is. An old name is refused with
#: this message rather than as an unknown key.
RENAMED_KEYS = {"run": ("experiment", ("the name of the experiment folder <results_dir>/<experiment>; a run is now "
                                       "one training run of it, a dataset, method and seed"))}


def check_renamed_keys(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the new name of every renamed key that ``config`` still uses."""
    problems = [f"{old}: was renamed {new!r} ({what}); write `{new}: {config[old]}`"
                for old, (new, what) in RENAMED_KEYS.items() if old in config]
    if problems:
        raise ConfigError("; ".join(problems))


def check_schema(config: dict[str, Any]) -> None:
    """Check ``config`` against :data:`SCHEMA` and fill in the schema's defaults, in place, as the
    Snakefile's ``snakemake.utils.validate`` does (a missing key of a mapping gets its default, then
    everything is checked), but with jsonschema alone: ``plan``, ``doctor``, ``calibrate`` and ``rehearse``
    run where Snakemake is not installed (a rule's conda environment). Raises :class:`ConfigError`
    naming the key of every value the schema refuses."""
    check_renamed_keys(config)
    _check_against(load_yaml(SCHEMA), config, "")


def report_settings(configfile: Path | None) -> dict[str, Any]:
    """The ``report`` block of the config file ``configfile`` (none: an empty one), checked against its part
    of the schema, with the schema's defaults filled in."""
    report = dict(load_config_mapping(configfile).get("report") or {}) if configfile else {}
    schema = load_yaml(SCHEMA)
    _check_against({"$schema": schema["$schema"], **schema["properties"]["report"]}, report, "report.")
    return report


def _check_against(schema: dict[str, Any], instance: Any, prefix: str) -> None:
    """:func:`check_schema` of ``instance`` against ``schema``, its keys named after ``prefix``."""
    import jsonschema

    checker = jsonschema.validators.validator_for(schema)
    check_properties = checker.VALIDATORS["properties"]

    def fill_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for key, property_schema in properties.items():
                if "default" in property_schema:
                    instance.setdefault(key, property_schema["default"])
        yield from check_properties(validator, properties, instance, subschema)

    filling = jsonschema.validators.extend(checker, {"properties": fill_defaults})
    errors = sorted(filling(schema).iter_errors(instance), key=lambda error: list(map(str, error.absolute_path)))
    if errors:
        problems = [f"{prefix}{'.'.join(map(str, error.absolute_path))}: {error.message}" if error.absolute_path
                    else f"{prefix.rstrip('.') or '(top level)'}: {error.message}" for error in errors]
        raise ConfigError(f"invalid config ({SCHEMA.relative_to(SCHEMA.parents[2])}):\n  " + "\n  ".join(problems))


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
            problems += hparams_problems(method, entry) or schedule_problems(config, method)
    reference = config.get("report", {}).get("reference_method")
    if reference is not None and reference not in method_names():
        problems.append(f"report.reference_method: {reference!r} is not a registered method; registered methods: "
                        f"{', '.join(method_names())}")
    for key in ("methods", "datasets"):
        for name in config.get("grid", {}).get(key, []):
            if name not in config.get(key, {}):
                problems.append(f"grid.{key}: {name!r} is not configured under {key}: ({', '.join(config.get(key, {}))})")
    for name, entry in config.get("datasets", {}).items():
        if "description" not in entry and name not in dataset_names():
            problems.append(f"datasets.{name}: unknown dataset; shipped datasets: {', '.join(dataset_names())}; "
                            "give a user's dataset its description file as 'description' (docs/adding-a-dataset.md)")
            continue
        try:
            spec = configured_dataset_spec(config, name)
        except DescriptionError as error:
            problems.append(f"datasets.{name}.description: {error}")
            continue
        if spec.name != name:
            problems.append(f"datasets.{name}.description: {entry['description']!r} describes {spec.name!r}; "
                            f"expected its 'name' to be {name!r}, the key it is configured under")
            continue
        if "synthetic" in entry and not spec.synthetic:
            problems.append(f"datasets.{name}.synthetic: only synthetic datasets are generated (their "
                            f"description has a 'synthetic' entry); give 'root' for {name}")
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
    problems += [f"seeds: {seed} is beyond {MAX_SEED} (2**32 - 1), the largest seed numpy and torch take"
                 for seed in config.get("seeds", []) if isinstance(seed, int) and seed > MAX_SEED]
    problems += overlapping_folders(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def overlapping_folders(config: dict[str, Any]) -> list[str]:
    """A problem when ``results_dir`` and ``resources_dir`` are one folder or one lies inside the other:
    a run's outputs would be taken for prepared datasets, or the reverse."""
    results, resources = (Path(config.get(key, default)).resolve()
                          for key, default in (("results_dir", "results"), ("resources_dir", "resources")))
    if results == resources or results in resources.parents or resources in results.parents:
        return [(f"results_dir ({config.get('results_dir', 'results')!r}) and resources_dir "
                f"({config.get('resources_dir', 'resources')!r}) overlap ({results} and {resources}); give two "
                "separate folders, neither inside the other")]
    return []


def preset_overrides(method: str, entry: dict[str, Any]) -> list[str]:
    """One problem per hparams key of ``method``'s config block (and of its ``stage1`` block) that its
    registry preset fixes. A preset is what makes the method that variant (PathMamba's Table 2 flags): a
    config that set ``use_miml: true`` under ``pathmamba-b`` would train another row under that name."""
    return [f"{prefix}.{key}: {method}'s registry preset fixes {key}={preset[key]!r}; a preset key cannot be "
            "set by config (remove it, or register another method)"
            for _, prefix, hparams, preset in _stage_hparams(method, entry)
            for key in sorted(set(hparams) & set(preset))]


def schedule_problems(config: dict[str, Any], method: str) -> list[str]:
    """A problem when ``method`` has a schedule of its own (``MethodSpec.epochs_from``: SC-CAM's CAM phase
    and rounds) whose epochs differ from its ``train.epochs``: its rounds would be cut short, or run past
    the epoch that is its final model."""
    spec = get_spec(method)
    if not spec.epochs_from:
        return []
    values = {**builder_defaults(method), **spec.preset, **(config["methods"][method] or {}).get("hparams", {})}
    parts = {key: values[key] for key in spec.epochs_from}
    scheduled = int(sum(sum(_numbers(value)) for value in parts.values()))
    epochs = train_settings(config, method).get("epochs")
    if epochs == scheduled:
        return []
    named = " + ".join(f"{key} {value!r}" for key, value in parts.items())
    return [(f"methods.{method}.train.epochs: {epochs!r}, but {method}'s schedule ({named}) takes {scheduled} "
             f"epochs; set methods.{method}.train.epochs: {scheduled} or change its schedule's hparams")]


def _stage_hparams(method: str, entry: dict[str, Any]):
    """(stage, config key prefix, hparams, registry preset) of ``method``'s config block ``entry`` and, where
    it has one, of its ``stage1`` block (stage 1)."""
    for stage, block in ((None, entry), (1, entry.get("stage1") or {})):
        if stage == 1 and not block:
            continue
        prefix = f"methods.{method}" + (".stage1" if stage else "") + ".hparams"
        yield stage, prefix, block.get("hparams") or {}, get_spec(method, stage).preset


#: Builder keywords whose value (or each value of a list) must be at least 1: widths, channel counts,
#: sizes, counts.
AT_LEAST_ONE = frozenset({"width", "backbone_width", "dims", "depths", "decoder_dim", "decoder_channels",
                          "encoder_depth", "patch_size", "d_state", "d_conv", "conv_kernel", "subcategories",
                          "cam_epochs", "round_epochs", "background_min_size"})
#: Builder keywords renamed, old name -> new name, and why (a config with the old name is refused naming
#: the new one).
RENAMED_HPARAMS = {"scan": ("mixer", ("PathMamba's token mixer, 'selective-scan' or 'conv', a registry preset; the "
                                      "training setting train.scan picks the selective scan's implementation"))}
#: What a scalar annotation accepts from YAML or JSON (a bool is no number there).
_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),),
            "dict": (dict,)}


def check_methods(config: dict[str, Any], methods: list[str]) -> None:
    """Raise :class:`ConfigError` (one line) when the config blocks of ``methods`` set a preset key or
    hparams their builders refuse: the start-up check of :func:`check_config` for the commands that build
    models without the workflow (``calibrate``) or plan them (``plan``)."""
    problems = [problem for method in methods for check in (preset_overrides, hparams_problems)
                for problem in check(method, config["methods"][method] or {})]
    if problems:
        raise ConfigError("; ".join(problems))


def hparams_problems(method: str, entry: dict[str, Any]) -> list[str]:
    """:func:`keyword_problems` of ``method``'s config block ``entry`` (and of its ``stage1`` block), each
    named by its config key; the preset's keys are left to :func:`preset_overrides`."""
    return [problem for stage, prefix, hparams, preset in _stage_hparams(method, entry)
            for problem in keyword_problems(method, stage, {key: value for key, value in hparams.items()
                                                            if key not in preset}, prefix)]


def keyword_problems(method: str, stage: int | None, hparams: dict[str, Any], prefix: str) -> list[str]:
    """One problem per key of ``hparams`` (named ``<prefix>.<key>``) that the builder of ``method``
    (``stage=1``: of its first stage) does not take (naming the nearest keyword), whose value is not of
    the annotated type, or that is a width, size or count below 1."""
    keywords = builder_keywords(method, stage)
    problems = []
    for key, value in hparams.items():
        renamed, why = RENAMED_HPARAMS.get(key, (None, ""))
        if key not in keywords and renamed in {**keywords, **get_spec(method, stage).preset}:
            problems.append(f"{prefix}.{key}: was renamed {renamed!r} ({why})")
        elif key not in keywords:
            nearest = difflib.get_close_matches(key, keywords, n=1)
            hint = f"did you mean {nearest[0]!r}? " if nearest else ""
            problems.append(f"{prefix}.{key}: {method} has no such keyword; {hint}its keywords: "
                            f"{', '.join(sorted(keywords))}")
        elif not _matches(value, keywords[key]):
            problems.append(f"{prefix}.{key}: {value!r} is not of type {keywords[key]}")
        elif key in AT_LEAST_ONE and any(number < 1 for number in _numbers(value)):
            problems.append(f"{prefix}.{key}: {value!r}; expected {'values' if isinstance(value, list) else 'a value'}"
                            " >= 1")
    return problems


def _numbers(value: Any) -> list[float]:
    """The numbers in ``value`` (a number, or a list of them)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in values if isinstance(item, (int, float)) and not isinstance(item, bool)]


def _matches(value: Any, annotation: str) -> bool:
    """Whether a YAML or JSON ``value`` fits the builder annotation ``annotation`` (its source text). Lists
    stand for sequences and tuples; an annotation this does not know (a class, ``Any``) accepts anything."""
    for option in (part.strip() for part in _split_top(annotation, "|")):
        sequence = re.fullmatch(r"(?:Sequence|tuple|list)\[(.*)\]", option)
        if sequence:
            items = [item for item in _split_top(sequence[1], ",") if item != "..."]
            if isinstance(value, (list, tuple)) and all(_matches(item, items[0]) for item in value):
                return True
            continue
        base = option.partition("[")[0]
        if base not in _SCALARS:
            return True
        if isinstance(value, _SCALARS[base]) and not (base in ("int", "float") and isinstance(value, bool)):
            return True
    return False


def _split_top(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside brackets, each part stripped."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == separator and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


@cache
def builder_keywords(method: str, stage: int | None = None) -> dict[str, str]:
    """``{keyword: annotation source text}`` of the builder of ``method`` (``stage=1``: its first stage),
    besides ``num_classes`` and its preset's keys, read from the source without importing it; a class
    whose ``__init__`` takes only ``*args, **kwargs`` has its base class's keywords."""
    spec = get_spec(method, stage)
    return {key: annotation for key, (annotation, _) in _builder_arguments(spec.target).items()
            if key != "num_classes" and key not in spec.preset}


def builder_defaults(method: str, stage: int | None = None) -> dict[str, Any]:
    """``{keyword: default value}`` of the builder of ``method`` for the keywords whose default is a
    literal (read as :func:`builder_keywords` reads the keywords)."""
    defaults = {}
    for key, (_, node) in _builder_arguments(get_spec(method, stage).target).items():
        try:
            defaults[key] = ast.literal_eval(node)
        except ValueError:  # no default (None), or one that is not a literal
            continue
    return defaults


@cache
def _builder_arguments(target: str) -> dict[str, tuple[str, ast.expr | None]]:
    """``{keyword: (annotation source text, default node or None)}`` of the class ``module:name``, its
    source parsed once per process (config checks ask for every method's keywords and defaults)."""
    module, _, name = target.partition(":")
    return _class_arguments(module, name)


def _class_arguments(module: str, name: str) -> dict[str, tuple[str, ast.expr | None]]:
    source = Path(importlib.util.find_spec(module).origin)
    tree = ast.parse(source.read_text(), str(source))
    found = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)
    init = next((node for node in found.body if isinstance(node, ast.FunctionDef) and node.name == "__init__"), None)
    if init and [*init.args.args[1:], *init.args.kwonlyargs]:
        positional = init.args.args[1:]
        defaults = [None] * (len(positional) - len(init.args.defaults)) + list(init.args.defaults)
        pairs = [*zip(positional, defaults, strict=True), *zip(init.args.kwonlyargs, init.args.kw_defaults, strict=True)]
        return {argument.arg: (ast.unparse(argument.annotation) if argument.annotation else "Any", default)
                for argument, default in pairs}
    base = ast.unparse(found.bases[0])
    imported = next((node.module for node in tree.body if isinstance(node, ast.ImportFrom)
                     and any(alias.name == base for alias in node.names)), module)
    return _class_arguments(imported, base)


def grid_methods(config: dict[str, Any]) -> list[str]:
    """The methods a run trains: ``grid.methods`` when given, else every configured method."""
    return list(config.get("grid", {}).get("methods") or config["methods"])


def configured_dataset_spec(config: dict[str, Any], name: str) -> DatasetSpec:
    """The spec of the configured dataset ``name``: from its ``description`` file when the config gives
    one (a user's dataset), else the shipped description of that name."""
    entry = config.get("datasets", {}).get(name, {})
    return get_dataset_spec(entry.get("description", name))


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
    """The weights files under ``<resources_dir>/weights/`` (:data:`pathmamba.core.layout.WEIGHTS_FOLDER`) that
    ``method``'s (``stage=1``: its first stage's) hparams name (``pretrained``, ``segmenter_pretrained``): what
    the fetch_weights rule writes."""
    prefix = f"{config['resources_dir']}/{WEIGHTS_FOLDER}/"
    return [value for value in method_hparams(config, method, stage).values()
            if isinstance(value, str) and value.startswith(prefix)]


def all_fetched_weights(config: dict[str, Any]) -> list[str]:
    """:func:`fetched_weights` of every configured method and first stage, sorted, each once."""
    return sorted({path for method in grid_methods(config)
                   for stage in training_stages(method)
                   for path in fetched_weights(config, method, stage)})
