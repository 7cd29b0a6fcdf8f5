"""Training under bf16 autocast (as the engine trains on CUDA): probabilities, pooling and losses stay in
float32, so saturated logits keep their gradient and a bf16 step follows the float32 one. Run with CPU
bf16 autocast, the same rounding of the same matmul and convolution outputs."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import IGNORE_INDEX, NUM_CLASSES
from torch.utils.data import DataLoader, TensorDataset

from pathmamba.data.specs import get_dataset_spec
from pathmamba.engine.registry import build_method, get_spec, method_names, two_stage_methods

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())["methods"]
DATASET = "synthetic-luad"
CPU = torch.device("cpu")
LABELS = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def loss_and_gradients(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one training step of a copy of ``model`` (bf16 autocast or float32) and its gradient
    over all parameters, flattened (a parameter without gradient counts as zeros)."""
    model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = model.loss(inputs, targets)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return loss.detach(), torch.cat([g.flatten() for g in grads])


def test_saturated_pathmamba_keeps_its_gradient_under_bf16_and_matches_float32():
    """Every class head of the demo-size PathMamba is pushed to logits above 8 on every pixel, where a
    bf16 sigmoid is exactly 1 and passes back exactly 0; a confident class, even a wrong one (targets
    are half negatives), then never learns. Before the float32 probabilities every one of the model's
    517,456 parameter gradients was exactly 0 here and the loss 20.70 against float32's 13.45.

    Tolerances: bf16 keeps 8 significant bits (relative rounding up to 2^-9, about 2e-3, per op). The
    loss is a float32 mean over many pixels of float32 functions of bf16-rounded logits, so those
    errors average out: relative error below 1e-3 (measured 4e-5 to 1.4e-4 over four seeds). The
    gradient goes back through some twenty bf16 convolutions and linear layers and the saturated
    sigmoid's slope exp(-logit) turns a logit's rounding (up to 9 * 2^-9) into a 2% relative error;
    measured cosine similarity to the float32 gradient 0.9981 to 0.9988 (relative error about 5%),
    required above 0.99 (relative error below about 14%); before the fix it was 0."""
    torch.manual_seed(0)
    model = build_method("pathmamba", num_classes=NUM_CLASSES, **DEMO["pathmamba"]["hparams"]).train()
    heads = [model.decoder.classifier, *model.stage_classifiers, *model.miml.side_classifiers]
    with torch.no_grad():
        for head in heads:
            head.weight.mul_(0.1)
            head.bias.fill_(9.0)
    inputs = images()

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = copy.deepcopy(model)(inputs)
    for logits in [out["y2"], *out["stages"]]:
        assert logits.min() > 8
        assert (torch.sigmoid(logits.bfloat16()) == 1).all()  # the saturated case this test is about
    for probs in [out["y1"], *out["sides"]]:  # the MIML branch's sigmoids run in float32: not rounded to 1
        assert probs.dtype == torch.float32 and probs.min() > 0.999 and probs.max() < 1

    loss32, grad32 = loss_and_gradients(model, inputs, LABELS, bf16=False)
    loss16, grad16 = loss_and_gradients(model, inputs, LABELS, bf16=True)
    assert loss16.dtype == torch.float32
    assert torch.isfinite(grad16).all()
    assert abs(float(loss16 - loss32)) / float(loss32) < 1e-3
    assert float(F.cosine_similarity(grad16, grad32, dim=0)) > 0.99

    # The heads are reached only through the saturated logits: every entry of their gradient is non-zero.
    bf16_model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = bf16_model.loss(inputs, LABELS)
    loss.backward()
    bf16_heads = [bf16_model.decoder.classifier, *bf16_model.stage_classifiers,
                  *bf16_model.miml.side_classifiers]
    for head in bf16_heads:
        assert (head.weight.grad != 0).all() and (head.bias.grad != 0).all()


def demo_hparams(method: str, stage: int | None) -> dict:
    entry = DEMO[method]
    return entry["stage1"]["hparams"] if stage == 1 else entry.get("hparams", {})


def model_and_targets(method: str, stage: int | None, inputs: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor]:
    """The demo-size model of ``method`` (``stage=1``: its first stage) and targets of its supervision:
    image labels, pixel masks with ignored pixels, or the pseudo masks of its own stage-1 classifier."""
    torch.manual_seed(0)
    supervision = get_spec(method, stage).supervision
    if supervision == "pseudo":
        stage1_hparams = demo_hparams(method, 1)
        stage1 = build_method(method, NUM_CLASSES, stage=1, **stage1_hparams).eval()
        model = build_method(method, NUM_CLASSES, stage1_hparams=stage1_hparams, **demo_hparams(method, None))
        model.init_from_stage1(stage1.state_dict())
        targets = torch.stack(stage1.pseudo_masks(inputs, LABELS, get_dataset_spec(DATASET)), dim=1)
    elif supervision == "pixel":
        model = build_method(method, NUM_CLASSES, **demo_hparams(method, None))
        targets = torch.randint(0, NUM_CLASSES + 1, (len(inputs), *inputs.shape[-2:]),
                                generator=torch.Generator().manual_seed(0))
        assert (targets == IGNORE_INDEX).any()
    else:
        model = build_method(method, NUM_CLASSES, stage=stage, **demo_hparams(method, stage))
        targets = LABELS
    return model.train(), targets


RUNS = [(name, None) for name in method_names()] + [(name, 1) for name in two_stage_methods()]


@pytest.mark.parametrize(("method", "stage"), RUNS, ids=[f"{m}-stage{s}" if s else m for m, s in RUNS])
def test_every_method_trains_and_predicts_in_float32_under_bf16_autocast(method, stage):
    """One training step of each method's demo model under bf16 autocast gives a float32, finite loss
    and finite gradients, and its prediction (as the engine evaluates on CUDA) float32 finite scores."""
    inputs = images()
    model, targets = model_and_targets(method, stage, inputs)
    if hasattr(model, "on_epoch_start"):
        # Epoch 3, as the engine calls it: SC-CAM has clustered (its sub-category loss is on) and
        # WSSS-Tissue's stage 1 drops the most activated positions (gamma below 1).
        loader = DataLoader(TensorDataset(inputs, LABELS), batch_size=len(inputs))
        model.on_epoch_start(3, loader, CPU, DATASET)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = model.loss(inputs, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    if method == "sc-cam":
        assert "subcategory" in parts
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.predict(inputs)
    assert scores.shape == (len(inputs), NUM_CLASSES, *inputs.shape[-2:])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
