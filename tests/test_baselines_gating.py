"""Masks of the CAM family hold only classes the method's own image-level prediction keeps (issue 18):
one crafted case per method, where every kept map is 0 at some pixels and class 0 is rejected; ties
among kept classes go to the most probable one. Also SC-CAM's sub-category labels and restarts, and the
multi-scale + flip inference."""

import pytest
import torch

import baselines.cam.gradcam as gradcam_module
import baselines.cam.histosegnet as histosegnet_module
from baselines.cam.cam import CAMClassifier
from baselines.cam.ccam import CCAM
from baselines.cam.gradcam import GradCAMClassifier
from baselines.cam.histosegnet import HistoSegNet
from baselines.cam.sccam import SCCAM
from baselines.cam.toolbox import REJECTED_SCORE, gate_classes, multiscale_flip_maps
from baselines.cam.wsss_tissue import WSSSTissue, WSSSTissueClassifier
from pathmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD, normalised_batch
from pathmamba.engine.evaluate import predict_split
from pathmamba.engine.registry import selection_predictor

TINY = {"backbone": "resnet18", "width": 8, "pretrained": "none", "output_stride": 8}
TINY_SEGMENTER = {"segmenter_encoder": "tu-lcnet_050", "decoder_channels": 8}
SIZE = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def crafted_maps() -> torch.Tensor:
    """Raw class maps (1, 4, SIZE, SIZE): class 0 and 3 negative (rejected: probability < 0.5), classes 1
    and 2 positive except in the top-left quarter, where both are negative (0 after ReLU). Class 2 has the
    larger mean, so the higher probability: it must win the tied quarter, not the lower index 1."""
    maps = torch.empty(1, 4, SIZE, SIZE)
    maps[:, 0], maps[:, 3] = -5.0, -5.0
    maps[:, 1], maps[:, 2] = 2.0, 3.0
    maps[:, 1:3, : SIZE // 2, : SIZE // 2] = -1.0
    return maps


def tissue_images() -> torch.Tensor:
    """A uniform pink tissue image (1, 3, SIZE, SIZE), ImageNet-normalised (no white background)."""
    rgb = torch.tensor([0.75, 0.45, 0.65]).view(1, 3, 1, 1).expand(1, 3, SIZE, SIZE)
    return (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def assert_only_kept_classes(scores: torch.Tensor, tied_winner: int | None = 2) -> None:
    mask = scores.argmax(1)[0]
    assert set(mask.unique().tolist()) <= {1, 2}, "a rejected class won pixels"
    assert (scores[:, [0, 3]] == REJECTED_SCORE).all()
    if tied_winner is not None:
        assert (mask[: SIZE // 2, : SIZE // 2] == tied_winner).all()


def test_gate_rejects_classes_and_breaks_ties_by_image_probability():
    scores = torch.zeros(1, 4, 2, 2)
    scores[0, 1, 1, 1] = 0.7  # one pixel where class 1 leads; elsewhere all classes tie at 0
    probabilities = torch.tensor([[0.2, 0.6, 0.9, 0.1]])  # class 0 and 3 rejected at 0.5
    gated = gate_classes(scores, probabilities, 0.5)
    assert gated.argmax(1).tolist() == [[[2, 2], [2, 1]]]
    assert (gated[:, [0, 3]] == REJECTED_SCORE).all()
    assert gated[0, 1, 1, 1] == 0.7 and gated[0, 2, 1, 1] == 0.0  # untied pixels unchanged
    # The top class is kept even below the threshold.
    assert gate_classes(scores, torch.tensor([[0.4, 0.1, 0.1, 0.1]]), 0.5).argmax(1).unique().tolist() == [0]


@pytest.mark.parametrize("model_class", [CAMClassifier, SCCAM, CCAM, WSSSTissueClassifier])
def test_cam_family_masks_hold_only_kept_classes(model_class, monkeypatch):
    """cam, sc-cam, c-cam and wsss-tissue's stage 1 share CAMClassifier.predict on their class maps."""
    model = model_class(num_classes=4, **TINY).eval()
    monkeypatch.setattr(model, "class_maps", lambda images: crafted_maps())
    assert_only_kept_classes(model.predict(tissue_images()))


def test_gradcam_masks_hold_only_kept_classes(monkeypatch):
    model = GradCAMClassifier(num_classes=4, **TINY).eval()
    maps = torch.relu(crafted_maps()) / 3  # Grad-CAM maps are in [0, 1]
    monkeypatch.setattr(gradcam_module, "grad_cam_maps", lambda *args: maps)
    monkeypatch.setattr(model, "forward", lambda images: crafted_maps().mean(dim=(2, 3)))
    assert_only_kept_classes(model.predict(tissue_images()))


def test_histosegnet_masks_hold_only_kept_classes(monkeypatch):
    """Class 0's Grad-CAM is high everywhere but the classifier rejects it: it gets no pixel, not even
    where the kept maps are 0 before the CRF."""
    model = HistoSegNet(num_classes=4, **TINY).eval()
    cams = torch.relu(crafted_maps()) / 3
    cams[:, 0] = 1.0
    monkeypatch.setattr(histosegnet_module, "resized_grad_cam", lambda *args: cams)
    monkeypatch.setattr(model.classifier, "forward", lambda features: crafted_maps())  # logits: their means
    marginals, _ = model.crf_marginals(tissue_images())
    assert (marginals[:, 0] == 0).all()  # a zero map stays out of the CRF, as in the original
    assert_only_kept_classes(model.predict(tissue_images()), tied_winner=None)


def test_histosegnet_maps_scale_by_confidence_and_subtract_over_all_labels(monkeypatch):
    """hsn_v1/gradcam.py: Grad-CAM x confidence; other = 0.05 (1 - max of tissue and background maps);
    subtraction over the C + 2 labels, "other" exempt."""
    model = HistoSegNet(num_classes=4, **TINY).eval()
    cams = torch.full((1, 4, SIZE, SIZE), 0.5)
    monkeypatch.setattr(histosegnet_module, "resized_grad_cam", lambda *args: cams)
    logits = torch.tensor([[2.0, 0.0, -3.0, -3.0]])  # probabilities 0.881, 0.5, rejected, rejected
    monkeypatch.setattr(model.classifier, "forward", lambda features: logits[:, :, None, None])
    maps, _ = model.label_maps(tissue_images())
    p0, p1 = torch.sigmoid(logits[0, :2])
    other = 0.05 * (1 - 0.5 * p0)
    torch.testing.assert_close(maps[0, 0], torch.full((SIZE, SIZE), float(0.5 * p0 - max(0.5 * p1, other))))
    assert (maps[0, 1:5] == 0).all()
    torch.testing.assert_close(maps[0, 5], torch.full((SIZE, SIZE), float(other)))


def test_histosegnet_runs_the_backbone_once_for_probabilities_and_grad_cam():
    """label_maps takes the class probabilities from the Grad-CAM's features: one backbone pass, the
    same probabilities as the model's forward, bit for bit."""
    torch.manual_seed(0)
    model = HistoSegNet(num_classes=4, **TINY).eval()
    images = torch.randn(2, 3, SIZE, SIZE)
    passes = []
    hook = model.features.register_forward_hook(lambda *args: passes.append(1))
    _, probabilities = model.label_maps(images)
    hook.remove()
    assert len(passes) == 1
    with torch.no_grad():
        assert torch.equal(probabilities, torch.sigmoid(model(images)))


def test_histosegnet_selects_without_the_crf_and_predicts_with_it(monkeypatch):
    """Model selection (predict_split with selection=True, as training calls it) scores the CRF's input
    maps of the kept classes and never runs the CRF; evaluation (selection=False) runs it per image."""
    torch.manual_seed(0)
    model = HistoSegNet(num_classes=4, **TINY).eval()
    crf_images, real_dense_crf = [], histosegnet_module.dense_crf

    def counted_dense_crf(image, maps, settings):
        crf_images.append(image.shape)
        return real_dense_crf(image, maps, settings)

    monkeypatch.setattr(histosegnet_module, "dense_crf", counted_dense_crf)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    loader = [(images, torch.zeros(2, SIZE, SIZE, dtype=torch.int64), torch.arange(2))]
    assert selection_predictor(model) == model.selection_scores
    assert selection_predictor(CAMClassifier(num_classes=4, **TINY)).__name__ == "predict"
    predict_split(model, loader, torch.device("cpu"), 4, selection=True)
    assert crf_images == []
    predict_split(model, loader, torch.device("cpu"), 4)
    assert len(crf_images) == 2
    normalised = normalised_batch(images, torch.device("cpu"))
    maps, probabilities = model.label_maps(normalised)
    torch.testing.assert_close(model.selection_scores(normalised), gate_classes(maps[:, :4], probabilities))


def test_wsss_tissue_masks_hold_only_kept_classes(monkeypatch):
    """Stage 2: the segmenter prefers class 0 everywhere, the stage-1 classifier rejects it."""
    model = WSSSTissue(num_classes=4, stage1_hparams=TINY, **TINY_SEGMENTER).eval()
    logits = torch.zeros(1, 4, SIZE, SIZE)
    logits[:, 0] = 5.0
    monkeypatch.setattr(model.segmenter, "forward", lambda images: logits)
    monkeypatch.setattr(model.classifier, "forward", lambda images: torch.tensor([[-5.0, -1.0, 2.0, -5.0]]))
    scores = model.predict(tissue_images())  # gate 0.1: class 1 (0.27) and 2 kept, tied everywhere
    assert (scores[:, 0] == REJECTED_SCORE).all() and (scores.argmax(1) == 2).all()


# --- multi-scale + flip inference -----------------------------------------------------------------

def test_multiscale_flip_maps_sum_the_passes_at_the_input_size():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) % 5 - 1
    seen = []

    def class_maps(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :2]

    plain = multiscale_flip_maps(class_maps, images)
    torch.testing.assert_close(plain, torch.relu(images[:, :2]))
    # A flipped pass flipped back is the plain pass: scale 1 with flip is twice the plain maps.
    torch.testing.assert_close(multiscale_flip_maps(class_maps, images, (1.0,), flip=True), 2 * plain)
    seen.clear()
    summed = multiscale_flip_maps(class_maps, images, (1.0, 0.5, 2.0), flip=True)
    assert seen == [(8, 8), (8, 8), (4, 4), (4, 4), (16, 16), (16, 16)] and summed.shape == (2, 2, 8, 8)


def test_sccam_predicts_over_its_scales_and_flips():
    torch.manual_seed(0)
    model = SCCAM(num_classes=4, scales=(1.0, 0.5, 1.5, 2.0), flip=True, **TINY).eval()
    images = torch.randn(1, 3, 32, 32)
    maps = multiscale_flip_maps(model.class_maps, images, model.scales, flip=True)
    scores = model.predict(images)
    kept = scores > REJECTED_SCORE
    torch.testing.assert_close(scores[kept], (maps / maps.amax(dim=(2, 3), keepdim=True))[kept])
    with pytest.raises(ValueError, match="scales"):
        CAMClassifier(num_classes=4, scales=(), **TINY)


# --- SC-CAM's sub-category labels -------------------------------------------------------------------

def _sccam_after_one_clustering(**hparams) -> tuple[SCCAM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = SCCAM(num_classes=4, subcategories=2, cam_epochs=1, round_epochs=(1,), **TINY, **hparams)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]] * 4, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    model.train()
    for p in model.features.parameters():  # some training before the clustering
        p.data.add_(0.01 * torch.randn_like(p))
    model.on_epoch_start(2, loader, torch.device("cpu"), "synthetic-luad")
    return model, images, labels


def test_sccam_labels_come_from_the_clustered_eval_mode_features(monkeypatch):
    model, images, labels = _sccam_after_one_clustering()
    clustered = {k: v.clone() for k, v in model.features.state_dict().items()}
    for p in model.features.parameters():  # training goes on within the round
        p.data.add_(0.05 * torch.randn_like(p))
    seen = []
    original = model.subcategory_targets
    monkeypatch.setattr(model, "subcategory_targets", lambda pooled, targets: seen.append(pooled) or original(pooled, targets))
    model.train().loss(images[:4], labels[:4])
    reference = SCCAM(num_classes=4, subcategories=2, **TINY)
    reference.features.load_state_dict(clustered)
    with torch.no_grad():
        expected = reference.eval().features(images[:4]).mean(dim=(2, 3))
    torch.testing.assert_close(seen[0], expected)  # the clustered model's eval-mode features
    assert not model.extractor.training


def test_sccam_restarts_from_its_initial_weights_each_round():
    torch.manual_seed(0)
    initial = SCCAM(num_classes=4, subcategories=2, cam_epochs=1, round_epochs=(1,), restart_each_round=True, **TINY)
    initial = {k: v.clone() for k, v in initial.state_dict().items()}
    model, _, _ = _sccam_after_one_clustering(restart_each_round=True)
    state = model.state_dict()
    for name in ("features.0.weight", "classifier.weight", "sub_classifier.weight"):
        torch.testing.assert_close(state[name], initial[name])
    assert not torch.equal(state["extractor.0.weight"], initial["features.0.weight"])
    assert int(model.rounds_done) == 1
