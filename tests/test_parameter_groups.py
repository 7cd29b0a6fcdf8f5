"""Optimiser parameter groups (pathmamba/engine/optim.py): no weight decay on PathMamba's state-space parameters
and on the 1-D parameters of its CMB branch; everything else, baselines included, decayed as before."""

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pathmamba.engine.config import method_hparams
from pathmamba.engine.optim import adam, parameter_groups
from pathmamba.engine.registry import build_method

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
PAPER = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SSM_FLAGGED = ("A_logs", "Ds", "dt_projs_bias")
CMB_BRANCH = ("encoder.", "decoder.", "stage_classifiers.")


def demo_model(method="pathmamba"):
    return build_method(method, 4, **method_hparams(DEMO, method))


def paper_model(method="pathmamba"):
    return build_method(method, 4, **{**method_hparams(PAPER, method), "pretrained": "none"})


def split(model, weight_decay=5e-4):
    """(names decayed, names not decayed), checking that each parameter is in exactly one group."""
    groups = parameter_groups(model, weight_decay)
    names = [g["name"] for g in groups]
    assert names in (["decay", "no_decay"], ["decay", "decay_lr_x0.01", "no_decay"])
    assert [g["weight_decay"] for g in groups] == [weight_decay] * (len(groups) - 1) + [0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    group_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    decay = {n for n, p in model.named_parameters() if group_of[id(p)] > 0}
    no_decay = {n for n, p in model.named_parameters() if group_of[id(p)] == 0}
    return decay, no_decay, groups


def check_pathmamba(model, decay, no_decay):
    flagged = {n for n in decay | no_decay if n.rsplit(".", 1)[-1] in SSM_FLAGGED}
    if any(isinstance(m, nn.Module) and hasattr(m, "A_logs") for m in model.modules()):
        assert flagged, "the selective-scan model has no A_logs / Ds / dt_projs_bias"
    assert flagged <= no_decay
    # every convolution and linear weight decays, in the CMB branch and in the MIML ResNet alike
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert f"{name}.weight" in decay, name
    for name in ("x_proj_weight", "dt_projs_weight"):
        assert all(n in decay for n in decay | no_decay if n.endswith(name))
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.startswith(CMB_BRANCH) and p.ndim <= 1:
            assert name in no_decay, name  # norms and biases of the CMB branch (VMamba's rule)
        if name.startswith("miml."):
            assert name in decay, name  # the ResNet decays everything, as the baselines' ResNets
    # nothing else is exempt
    assert no_decay == flagged | {n for n, p in params.items() if n.startswith(CMB_BRANCH) and p.ndim <= 1}


@pytest.mark.parametrize("method", ["pathmamba", "pathmamba-b", "pathmamba-b-miml-cmb", "pathmamba-noscan"])
def test_demo_size_pathmamba_groups(method):
    model = demo_model(method)
    decay, no_decay, _ = split(model)
    check_pathmamba(model, decay, no_decay)
    if method == "pathmamba-noscan":
        assert not any(n.endswith(SSM_FLAGGED) for n in decay | no_decay)  # no scan, no SSM parameters


def test_paper_size_pathmamba_groups():
    model = paper_model()
    decay, no_decay, groups = split(model)
    check_pathmamba(model, decay, no_decay)
    assert sum(n.endswith("A_logs") for n in no_decay) == 15  # one DC-Mamba per CMB layer, depths 2/2/9/2
    counts = {g["name"]: (len(g["params"]), sum(p.numel() for p in g["params"])) for g in groups}
    print("\npaper-size pathmamba parameter groups (tensors, scalars):", counts)
    flagged = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in SSM_FLAGGED]
    print("  of which flagged A_logs/Ds/dt_projs_bias:", (len(flagged), sum(p.numel() for p in flagged)))


@pytest.mark.parametrize("method", ["pathmamba", "pathmamba-b-miml"])
def test_miml_side_classifiers_train_at_a_hundredth_of_the_learning_rate(method):
    """The authors' functions/train.py: decoder1-3 (models/mil.py's 1x1 side classifiers) at lr / 100."""
    model = demo_model(method)
    optimiser = adam(model, lr=1e-3, weight_decay=5e-4)
    lr_of = {id(p): g["lr"] for g in optimiser.param_groups for p in g["params"]}
    side = {n for n, _ in model.named_parameters() if n.startswith("miml.side_classifiers.")}
    assert side and all(n.endswith((".weight", ".bias")) for n in side)
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(1e-5 if name in side else 1e-3), name


def test_a_model_without_miml_has_no_scaled_group():
    assert [g["name"] for g in parameter_groups(demo_model("pathmamba-b"), 5e-4)] == ["decay", "no_decay"]


def test_baselines_keep_one_decayed_group_in_parameter_order():
    model = build_method("cam", 4, **method_hparams(DEMO, "cam"))
    groups = parameter_groups(model, 5e-4)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 5e-4
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_flags_survive_to_and_frozen_parameters_stay_in_their_group():
    model = demo_model().to(torch.float64)
    model.encoder.requires_grad_(False)
    _, no_decay, _ = split(model)
    assert "encoder.stages.0.layers.0.dc_mamba.A_logs" in no_decay


def test_adam_step_with_zero_gradient_moves_only_decayed_parameters():
    torch.manual_seed(0)
    model = demo_model()
    decay, no_decay, groups = split(model)
    optimiser = torch.optim.Adam(groups, lr=1e-3)  # as pathmamba.engine.train builds it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimiser.step()
    after = dict(model.named_parameters())
    for name in no_decay:
        assert torch.equal(after[name], before[name]), name
    # L2 decay turns a zero gradient into weight_decay * p: every decayed parameter with a nonzero
    # entry moves (towards zero)
    for name in decay:
        if before[name].abs().max() > 0:
            assert not torch.equal(after[name], before[name]), name
            assert after[name].abs().sum() < before[name].abs().sum(), name
