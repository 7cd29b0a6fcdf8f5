"""Every registered method trained through the engine on synthetic data; UNet, Grad-CAM and HistoSegNet
pieces checked against hand computations."""

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from conftest import IGNORE_INDEX, NUM_CLASSES, train_like_the_workflow

from baselines.cam.classifier import MultiLabelResNet
from baselines.cam.crf import CRFSettings, build_crf, dense_crf
from baselines.cam.gradcam import grad_cam_maps
from baselines.cam.histosegnet import background_map, subtract_other_classes, to_rgb255
from baselines.unet import UNet
from pathmamba.data.datasets import ImageMaskDataset, normalised_batch, to_tensor
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import load_model
from pathmamba.engine.registry import get_spec, method_names
from pathmamba.engine.train import TrainSettings

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
DATASET = "synthetic-luad"
N_VAL, N_TEST = 10, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the demo runs its jobs (threads_per_job: 1); on a shared 2-core machine more
    threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baselines") / DATASET
    make_synthetic_dataset(DATASET, root, n_train=8, n_val=N_VAL, n_test=N_TEST, size=64, seed=0)
    return root


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_predicts_masks(method, data_root, tmp_path):
    """The method's demo settings (config/demo.yaml) through the engine: two steps per epoch, then the
    best model's scores on the test images are finite (B, 4, H, W) floats whose argmax is a class."""
    entry = DEMO["methods"].get(method)
    assert entry is not None, f"{method} has no entry in config/demo.yaml"
    # One epoch (of each stage, for a two-stage method).
    settings = TrainSettings(epochs=1, batch_size=4, lr=1e-3, device="cpu")
    record = train_like_the_workflow(method, DATASET, data_root, tmp_path, entry, settings)
    if get_spec(method).supervision == "pixel":
        assert record["train_images"] == N_VAL - round(0.2 * N_VAL)  # the fixed 80/20 split of val
    assert np.isfinite(record["best_val_mIoU"])

    _, model = load_model(tmp_path / "run" / "model.pt")
    model.eval()
    index = index_dataset(data_root, get_dataset_spec(DATASET))
    test = ImageMaskDataset(index.test, get_dataset_spec(DATASET))
    images = normalised_batch(torch.stack([test[i][0] for i in range(N_TEST)]), torch.device("cpu"))
    with torch.no_grad():  # as the engine predicts
        scores = model.predict(images)
    assert scores.shape == (N_TEST, NUM_CLASSES, 64, 64)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    masks = scores.argmax(1)
    assert masks.dtype == torch.int64 and 0 <= masks.min() and masks.max() <= NUM_CLASSES - 1


# --- UNet ---------------------------------------------------------------------------------------------

TINY_UNET = {"encoder": "tu-resnet18", "encoder_kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8},
             "decoder_channels": [16, 8, 8, 8, 4]}


def test_unet_loss_is_cross_entropy_over_scored_pixels_only():
    torch.manual_seed(0)
    model = UNet(**TINY_UNET).eval()
    images = torch.randn(2, 3, 32, 32)
    targets = torch.randint(0, NUM_CLASSES + 1, (2, 32, 32))
    loss, parts = model.loss(images, targets)
    logits = model(images)
    scored = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[scored], targets[scored])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert parts["ce"] == pytest.approx(float(expected.detach()), abs=1e-6)
    all_background, _ = model.loss(images, torch.full_like(targets, IGNORE_INDEX))
    assert float(all_background.detach()) == 0.0


def test_unet_loads_a_torchvision_resnet_state_dict_into_its_encoder(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = UNet(encoder="resnet18", pretrained=str(path), decoder_channels=[16, 8, 8, 8, 4])
    assert torch.equal(model.net.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        UNet(encoder="resnet18", pretrained=str(tmp_path / "missing.pth"))


# --- Grad-CAM -----------------------------------------------------------------------------------------

def test_grad_cam_of_the_classifier_is_its_normalised_class_activation_map():
    """The logit is the spatial mean of W . A, so the gradient with respect to A_k is W_ck / (h w)
    everywhere and Grad-CAM = ReLU(CAM_c) / (h w): after pytorch-grad-cam's min-max scaling and
    bilinear resize it equals the min-max scaled, upsampled ReLU(CAM)."""
    torch.manual_seed(0)
    model = MultiLabelResNet(backbone="resnet18", width=8, output_stride=8).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = grad_cam_maps(model, [model.features[-1]], images, NUM_CLASSES)
    with torch.no_grad():
        cams = F.relu(model.class_maps(images))
    cams = F.interpolate(cams, size=(32, 32), mode="bilinear", align_corners=False)
    low, high = cams.amin(dim=(2, 3), keepdim=True), cams.amax(dim=(2, 3), keepdim=True)
    expected = (cams - low) / (high - low + 1e-7)
    assert maps.shape == (2, NUM_CLASSES, 32, 32)
    assert torch.allclose(maps, expected, atol=1e-3)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="ReLU has no parameters"):
        grad_cam_maps(model, [model.features[2]], images, NUM_CLASSES)


def package_grad_cam(model, target_layers, images, num_classes):
    """pytorch-grad-cam's GradCAM, one forward and backward per class (what grad_cam_maps ran before)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=model, target_layers=target_layers) as cam:
        maps = [cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images))
                for c in range(num_classes)]
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.stack(maps, axis=1))


@pytest.mark.parametrize("layers", [[-1], [-2], [-2, -1]], ids=["layer4", "layer3", "layer3+layer4"])
def test_grad_cam_from_one_forward_equals_the_packages(layers):
    """One forward for every class gives pytorch-grad-cam's maps: at layer4 (gradient constant over
    space), at layer3 (the gradient comes back through layer4), and averaged over both."""
    torch.manual_seed(0)
    model = MultiLabelResNet(backbone="resnet18", width=8, output_stride=8).eval()
    images = torch.randn(3, 3, 40, 48)
    target_layers = [model.features[i] for i in layers]
    passes = []
    hook = model.features[0].register_forward_hook(lambda *args: passes.append(1))
    ours = grad_cam_maps(model, target_layers, images, NUM_CLASSES)
    hook.remove()
    assert len(passes) == 1
    theirs = package_grad_cam(model, target_layers, images, NUM_CLASSES)
    assert ours.shape == theirs.shape == (3, NUM_CLASSES, 40, 48)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # measured 1.4e-6 (float32 sums)


# --- HistoSegNet --------------------------------------------------------------------------------------

def test_class_subtraction_keeps_the_dominant_class_and_its_margin():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 4, 8, 8, generator=g) * 0.5
    maps[:, 2, :4] += 0.6  # class 2 leads in the top half
    out = subtract_other_classes(maps)
    others = maps[:, [0, 1, 3], :4].amax(dim=1)
    assert torch.equal(out[:, :, :4].argmax(1), torch.full((2, 4, 8), 2))
    assert torch.allclose(out[:, 2, :4], maps[:, 2, :4] - others)
    assert (out[:, [0, 1, 3], :4] == 0).all()
    # Everywhere exactly one class is positive (the leader) unless the top two tie.
    assert ((out > 0).sum(1) <= 1).all() and (out >= 0).all()


def test_background_map_is_three_quarters_on_glass_and_zero_on_tissue():
    image = np.empty((32, 32, 3), dtype=np.uint8)
    image[:, :16] = 255  # glass
    image[:, 16:] = (200, 120, 170)  # pink-purple tissue
    score = background_map(to_rgb255(to_tensor(image)[None]))
    assert score.shape == (1, 1, 32, 32)
    assert torch.allclose(score[0, 0, :, :8], torch.tensor(0.75), atol=1e-3)
    assert score[0, 0, :, 24:].max() < 1e-3


def _toy_crf_input(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 24 x 24 image with a white left half and a purple right half, label maps that say the same but
    with every fourth pixel's two maps swapped: (image, probabilities (2, H, W), truth (H, W))."""
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    image[:, :12] = 250
    image[:, 12:] = (120, 60, 140)
    truth = np.zeros((24, 24), dtype=np.int64)
    truth[:, 12:] = 1
    probabilities = np.stack([truth == 0, truth == 1]).astype(np.float32) * 0.5 + 0.25
    flipped = np.random.default_rng(seed).random((24, 24)) < 0.25
    probabilities[:, flipped] = probabilities[::-1][:, flipped]
    return image, probabilities, truth


def test_crf_mean_field_never_increases_its_energy_and_cleans_label_noise():
    image, probabilities, truth = _toy_crf_input()
    crf = build_crf(image, probabilities, CRFSettings())
    q, scratch1, scratch2 = crf.startInference()
    energies = [crf.klDivergence(q)]
    for _ in range(5):
        crf.stepInference(q, scratch1, scratch2)
        energies.append(crf.klDivergence(q))
    assert all(later <= earlier + 1e-6 * abs(earlier) for earlier, later in pairwise(energies))
    assert energies[-1] < energies[0]

    noisy = (probabilities.argmax(0) != truth).mean()
    marginals = dense_crf(image, probabilities)
    assert marginals.shape == (2, 24, 24)
    assert np.allclose(marginals.sum(0), 1, atol=1e-4)
    assert noisy > 0.15 and (marginals.argmax(0) != truth).mean() < 0.02


def test_crf_rejects_an_image_that_does_not_match_the_maps():
    image, probabilities, _ = _toy_crf_input()
    with pytest.raises(ValueError, match=r"\(24, 24, 3\) uint8"):
        dense_crf(image[:20], probabilities)
