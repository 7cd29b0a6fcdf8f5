"""The registry: its factory, and the method contract (pathmamba/engine/registry.py's protocols) for every entry."""

import re

import pytest
import torch
import yaml
from conftest import REPO

from pathmamba.engine import registry
from pathmamba.engine.registry import (
    EpochAware,
    FirstStage,
    Method,
    MethodSpec,
    SecondStage,
    build_method,
    get_spec,
    method_names,
    two_stage_methods,
)

DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
BUILDS = [(name, None) for name in method_names()] + [(name, 1) for name in two_stage_methods()]


def demo_hparams(name: str, stage: int | None) -> dict:
    entry = DEMO["methods"][name]
    return (entry.get("stage1", {}) if stage == 1 else entry).get("hparams", {})


@pytest.mark.parametrize(("name", "stage"), BUILDS)
def test_every_registered_model_follows_its_protocol(name, stage):
    model = build_method(name, num_classes=4, stage=stage, **demo_hparams(name, stage))
    assert isinstance(model, torch.nn.Module)
    assert isinstance(model, Method)
    if stage == 1:
        assert isinstance(model, FirstStage)
        assert len(model.pseudo_mask_names) >= 1
    elif name in two_stage_methods():
        assert isinstance(model, SecondStage)
    else:
        assert not isinstance(model, FirstStage)


def test_methods_with_epoch_state_are_the_reclustering_and_dropout_ones():
    """The engine calls on_epoch_start only where a method has one: exactly these."""
    aware = sorted(f"{name}/stage{stage}" if stage else name for name, stage in BUILDS
                   if isinstance(build_method(name, 4, stage, **demo_hparams(name, stage)), EpochAware))
    assert aware == ["sc-cam", "wsss-tissue/stage1"]


class NoPredict(torch.nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()

    def loss(self, images, targets):
        return images.sum(), {}


def test_a_model_without_predict_is_refused_naming_builder_and_protocol(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "broken", MethodSpec(f"{__name__}:NoPredict"))
    with pytest.raises(TypeError, match=r"test_registry:NoPredict built NoPredict, which does not follow the "
                                        r"Method protocol"):
        build_method("broken", num_classes=4)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(KeyError, match=r"registered methods: .*pathmamba-b-miml"):
        get_spec("pathmamba-c")
    with pytest.raises(ValueError, match=r"methods with a first stage .*wsss-tissue"):
        get_spec("cam", stage=1)


def test_a_preset_key_in_config_hparams_is_refused_at_start_up_naming_method_and_key():
    """pathmamba-b with use_miml: true would build the MIML variant and report it as Table 2's row a."""
    from pathmamba.engine.config import ConfigError, check_config
    from pathmamba.operations.doctor import FAIL, check_config_values

    config = {"methods": {"pathmamba-b": {"hparams": {"use_miml": True, "dims": [8, 8, 8, 8]}},
                          "pathmamba-noscan": {"hparams": {"mixer": "selective-scan"}},
                          "cam": {"hparams": {"use_miml": True}}}}
    with pytest.raises(ConfigError) as error:
        check_config(config)
    message = str(error.value)
    assert "methods.pathmamba-b.hparams.use_miml" in message and "use_miml=False" in message
    assert "methods.pathmamba-noscan.hparams.mixer" in message
    assert "dims" not in message  # not a preset key: a builder keyword
    # cam has no preset: its use_miml is a keyword its builder does not take, not a preset override
    assert "methods.cam.hparams.use_miml: cam has no such keyword; its keywords: backbone, " in message
    assert "methods.cam.hparams.use_miml: cam's registry preset" not in message
    assert check_config_values(config).status == FAIL
    check_config({"methods": {"pathmamba-b": {"hparams": {"dims": [8, 8, 8, 8]}}}})


def test_build_method_refuses_to_override_a_preset_key():
    with pytest.raises(ValueError, match="use_dcl"):
        build_method("pathmamba-b-miml", num_classes=4, use_dcl=True)


# How the tables and figures show each method comes from its entry (MethodSpec's reporting fields).


def test_table2_rows_are_the_ablation_entries_in_their_positions():
    positions = [get_spec(name).ablation.position for name in registry.ablation_methods()]
    assert positions == sorted(set(positions))  # one row per position
    assert registry.ablation_methods()[0] == "pathmamba-b" and "cam" not in registry.ablation_methods()


def test_a_supervision_the_tables_cannot_name_is_refused_naming_the_builder():
    with pytest.raises(ValueError, match=r"baselines.my:Method: supervision 'points'; expected one of image, pseudo"):
        MethodSpec("baselines.my:Method", supervision="points")


HEATMAPS = [(name, heatmap) for name in method_names() for heatmap in get_spec(name).heatmaps]


@pytest.mark.parametrize(("name", "heatmap"), HEATMAPS, ids=[f"{name}-{h.title}" for name, h in HEATMAPS])
def test_every_heat_map_of_the_registry_gives_class_maps_in_zero_one(name, heatmap):
    torch.manual_seed(0)
    model = build_method(name, num_classes=4, **demo_hparams(name, None)).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = registry.load_target(heatmap.maps)(model, images)
    assert maps.shape == (2, 4, 32, 32) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert not any(parameter.grad is not None for parameter in model.parameters())  # nothing left behind


#: Method names that also name something else in the package: the package itself (loggers, the program).
NOT_ONLY_METHODS = {"pathmamba"}


def test_no_module_but_the_registry_names_a_method():
    """Tables, figures, plans and rules read what they need from the registry: a method's name spelled
    as a string anywhere else in pathmamba/ or workflow/ would be a list that adding a method must edit."""
    names = [name for name in method_names() if name not in NOT_ONLY_METHODS]
    alternatives = "|".join(map(re.escape, names))
    spelled = re.compile(rf"""["']({alternatives})["']""")
    files = [*sorted((REPO / "pathmamba").rglob("*.py")), *sorted((REPO / "workflow").rglob("*.smk")),
             REPO / "workflow" / "Snakefile"]
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in files if path.name != "registry.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if spelled.search(line)]
    assert not found, "\n".join(found)
