"""Method-specific tests of SC-CAM, C-CAM and WSSS-Tissue (the shared build/train/predict test is
tests/test_baselines.py)."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
import torchvision
from conftest import IGNORE_INDEX, train_like_the_workflow, train_preempted_after
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from baselines.cam.ccam import CCAM
from baselines.cam.sccam import SCCAM
from baselines.cam.toolbox import REJECTED_SCORE, gray_background_mask, white_background_mask
from baselines.cam.wsss_tissue import (
    WSSSTissue,
    WSSSTissueClassifier,
    dropout_attention,
    dropout_gamma,
    pseudo_mask,
)
from pathmamba.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageLabelDataset, normalised_batch
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import load_model
from pathmamba.engine.train import EpochSeeded, TrainSettings, train

TINY = {"backbone": "resnet18", "width": 8, "pretrained": "none", "output_stride": 8}
TINY_SEGMENTER = {"segmenter_encoder": "tu-lcnet_050", "decoder_channels": 8}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rgb_to_input(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..1 -> the normalised model input."""
    return (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def half_white_images(n: int = 2, size: int = 32) -> torch.Tensor:
    """Images whose left half is white glass and right half dark pink tissue."""
    rgb = torch.empty(n, 3, size, size)
    rgb[..., : size // 2] = 1.0
    rgb[..., size // 2:] = torch.tensor([0.6, 0.3, 0.5]).view(1, 3, 1, 1)
    return rgb_to_input(rgb)


# --- SC-CAM ---------------------------------------------------------------------------------------

def grouped_features(classes: int, groups: int, per_group: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-label features in well separated groups: (features (N, dim), labels (N, C), group (N,))."""
    generator = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.randn(classes, groups, dim, generator=generator)
    features, labels, group = [], [], []
    for c in range(classes):
        for g in range(groups):
            features.append(centres[c, g] + 0.1 * torch.randn(per_group, dim, generator=generator))
            labels.append(torch.nn.functional.one_hot(torch.full((per_group,), c), classes).float())
            group.append(torch.full((per_group,), g))
    return torch.cat(features), torch.cat(labels), torch.cat(group)


def test_subcategory_labels_refine_the_parent_labels_and_recover_the_clusters():
    model = SCCAM(num_classes=4, subcategories=3, **TINY)
    dim = model.centroids.shape[-1]
    features, labels, group = grouped_features(4, 3, 5, dim)
    model.cluster(features, labels)
    assert int(model.rounds_done) == 1 and bool(model.centroid_valid.all())

    targets = model.subcategory_targets(features, labels).view(len(features), 4, 3)
    # A refinement: exactly one sub-category under each of the image's classes, none elsewhere.
    assert torch.equal(targets.sum(dim=2), labels)
    sub_index = targets.sum(dim=1).argmax(dim=1)
    for c in range(4):
        for g in range(3):
            members = sub_index[(labels[:, c] > 0) & (group == g)]
            assert len(set(members.tolist())) == 1  # one generating group -> one sub-category
        assert len(set(sub_index[labels[:, c] > 0].tolist())) == 3  # and the groups stay apart

    # Multi-label image: one sub-category per parent class it carries.
    both = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    multi = model.subcategory_targets(features[:1], both).view(1, 4, 3)
    assert torch.equal(multi.sum(dim=2), both)

    # The clustering lives in the state dict: a resumed model assigns the same sub-categories.
    resumed = SCCAM(num_classes=4, subcategories=3, **TINY)
    resumed.load_state_dict(model.state_dict())
    assert torch.equal(resumed.subcategory_targets(features, labels), targets.flatten(1))


def test_a_class_with_fewer_images_than_subcategories_uses_only_its_clusters():
    model = SCCAM(num_classes=4, subcategories=3, **TINY)
    features, labels, _ = grouped_features(4, 3, 5, model.centroids.shape[-1])
    keep = (labels[:, 1] == 0) | (torch.arange(len(labels)) == int(labels[:, 1].argmax()))  # one image of class 1
    model.cluster(features[keep], labels[keep])
    assert model.centroid_valid.sum(dim=1).tolist() == [3, 1, 3, 3]
    targets = model.subcategory_targets(features[keep], labels[keep]).view(-1, 4, 3)
    assert targets[:, 1, 1:].sum() == 0  # never an empty cluster


def test_reclustering_happens_at_the_start_of_each_round_of_the_schedule():
    model = SCCAM(num_classes=4, subcategories=2, cam_epochs=2, round_epochs=(2, 3), **TINY)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]] * 4, dtype=torch.float32)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    done = []
    for epoch in range(1, 9):
        model.on_epoch_start(epoch, loader, CPU, "synthetic-luad")
        done.append(int(model.rounds_done))
    assert done == [0, 0, 1, 1, 2, 2, 2, 2]  # clustered at the start of epochs 3 and 5 only
    assert model.final_epoch == 7 and [e for e in range(1, 9) if model.selectable_epoch(e, 7)] == [7]

    _, parts = model.loss(images[:4], labels[:4])
    assert set(parts) == {"parent", "subcategory"}
    _, parts = SCCAM(num_classes=4, **TINY).loss(images[:4], labels[:4])
    assert set(parts) == {"parent"}  # before the first clustering only the parent head learns


# --- C-CAM ----------------------------------------------------------------------------------------

def test_white_background_mask_marks_white_glass_only():
    mask = white_background_mask(half_white_images(size=16))
    assert mask.shape == (2, 1, 16, 16)
    assert mask[..., :8].min() == 1.0 and mask[..., 8:].max() == 0.0


def test_ccam_anatomy_prior_is_the_tissue_mask_and_acts_in_training_only():
    torch.manual_seed(0)
    model = CCAM(num_classes=4, **TINY).eval()
    images = half_white_images(size=32)
    prior = model.tissue_prior(images, (4, 4))
    assert torch.equal(prior, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, 1, 4, 4))

    # No white-pixel zeroing at prediction: the scores are the gated refined maps everywhere (zeroed
    # scores sent white-looking tissue to class 0, kept or not).
    scores = model.predict(images)
    assert scores.shape == (2, 4, 32, 32)
    refined = torch.nn.functional.interpolate(torch.relu(model.maps(images)[1]), size=(32, 32),
                                              mode="bilinear", align_corners=False)
    kept = scores > REJECTED_SCORE
    expected = refined / refined.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    torch.testing.assert_close(scores[kept], expected[kept])

    loss, parts = model.train().loss(images, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]]))
    assert torch.isfinite(loss) and set(parts) == {"category", "anatomy"}


def test_ccam_refined_maps_start_equal_to_the_coarse_maps():
    torch.manual_seed(0)
    model = CCAM(num_classes=4, **TINY).eval()
    coarse, refined = model.maps(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(refined, coarse)


# --- WSSS-Tissue ----------------------------------------------------------------------------------

def test_progressive_dropout_gamma_schedule():
    """1_train_stage1.py: gamma starts at 1 and is multiplied by 0.98 after every epoch while above 0.65
    (so once more at 0.98^21 = 0.654); PDA is on from the fourth epoch (0-based ``ep > 2``)."""
    assert dropout_gamma(1) == 1.0
    assert dropout_gamma(2) == pytest.approx(0.98)
    assert dropout_gamma(4) == pytest.approx(0.98**3)
    assert dropout_gamma(22) == pytest.approx(0.98**21)  # 0.654, still above the floor
    assert dropout_gamma(23) == dropout_gamma(100) == pytest.approx(0.98**22)  # 0.641, then fixed

    model = WSSSTissueClassifier(num_classes=4, **TINY)
    seen = []
    for epoch in (1, 3, 4):
        model.on_epoch_start(epoch, None, CPU, "synthetic-bcss")
        seen.append((round(float(model.gamma), 4), bool(model.pda)))
    assert seen == [(1.0, False), (0.9604, False), (0.9412, True)]


def test_dropout_attention_is_the_mean_of_cams_with_their_peaks_dropped():
    """tool/ADL_module.py: per class, ReLU'd CAM values above gamma x the class maximum become 0; the
    attention is the mean over all classes (labelled or not)."""
    cams = torch.tensor([[[[1.0, 0.5], [-2.0, 0.2]],
                          [[0.1, 0.3], [0.4, 0.0]]]])  # (1, 2, 2, 2)
    attention = dropout_attention(cams, gamma=0.6)
    # class 0: max 1 -> values > 0.6 dropped: [[0, 0.5], [0, 0.2]]; class 1: max 0.4 -> > 0.24 dropped
    expected = (torch.tensor([[0.0, 0.5], [0.0, 0.2]]) + torch.tensor([[0.1, 0.0], [0.0, 0.0]])) / 2
    torch.testing.assert_close(attention, expected.view(1, 1, 2, 2))


def test_pda_multiplies_the_features_by_the_attention_once_on():
    torch.manual_seed(0)
    model = WSSSTissueClassifier(num_classes=4, feature_dropout=0.0, **TINY).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(model(images), labels)
    model.on_epoch_start(3, None, CPU, "synthetic-luad")
    torch.testing.assert_close(model.loss(images, labels)[0], plain)  # PDA still off
    model.on_epoch_start(4, None, CPU, "synthetic-luad")
    features = model.features(images)
    kept = features * dropout_attention(model.classifier(features), float(model.gamma))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(model.classifier(kept).mean(dim=(2, 3)), labels)
    torch.testing.assert_close(model.loss(images, labels)[0], expected)


def test_pseudo_masks_normalise_signed_gradcams_over_all_classes_together():
    """tool/infer_fun.py: one min-max over the stack of all classes, no ReLU, then the image's labels."""
    maps = torch.zeros(1, 4, 2, 2)
    maps[0, 0] = torch.tensor([[4.0, 1.0], [-1.0, -3.0]])  # strong class
    maps[0, 3] = torch.tensor([[0.5, 0.5], [-2.0, -2.0]])  # weak class
    maps[0, 1] = 9.0  # not in the labels: never chosen, though it sets the range
    labels = torch.tensor([[1.0, 0, 0, 1]])
    mask = pseudo_mask(maps, labels, (2, 2))
    # (0, 1): 1.0 > 0.5 jointly (per-class scaling would give class 0 0.25 < 1); (1, 0): both negative,
    # -1 > -2 (a ReLU would tie them at 0).
    assert mask.tolist() == [[[0, 0], [0, 3]]]


def test_luad_background_is_a_gray_threshold_without_small_objects():
    """tool/infer_utils.py gen_bg_mask: gray > 200, 4-connected components under 50 px removed."""
    rgb = torch.full((1, 3, 16, 16), 0.4)  # tissue
    rgb[..., :, :8] = 1.0  # 128 px of glass: background
    rgb[..., 0:3, 10:13] = 1.0  # 9 px bright speck: stays tissue
    rgb[..., 10:16, 8:16] = torch.tensor([1.0, 0.9, 0.47]).view(1, 3, 1, 1)  # gray 225, mean RGB 0.79
    mask = gray_background_mask(rgb_to_input(rgb))[0, 0]
    assert mask[:, :8].min() == 1 and mask[0:3, 10:13].max() == 0
    assert mask[10:, 8:].min() == 1  # 48 px, but joined to the glass on its left
    assert white_background_mask(rgb_to_input(rgb))[0, 0, 10:, 8:].max() == 0  # mean RGB would miss it


def test_pseudo_masks_ignore_background_only_where_asked():
    maps = torch.rand(2, 4, 4, 4)
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    background = gray_background_mask(half_white_images(size=16))
    plain = pseudo_mask(maps, labels, (16, 16))
    assert set(plain[0].unique().tolist()) <= {0, 3} and set(plain[1].unique().tolist()) == {2}
    with_background = pseudo_mask(maps, labels, (16, 16), background)
    assert (with_background[..., :8] == IGNORE_INDEX).all()
    assert torch.equal(with_background[..., 8:], plain[..., 8:])


def test_white_background_channel_only_on_white_glass_datasets():
    torch.manual_seed(0)
    model = WSSSTissueClassifier(num_classes=4, **TINY).eval()
    images, labels = half_white_images(size=32), torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]])
    for dataset, expect_white in [("synthetic-luad", True), ("luad-histoseg", True),
                                  ("synthetic-bcss", False), ("bcss-wsss", False)]:
        assert get_dataset_spec(dataset).white_glass is expect_white
        masks = model.pseudo_masks(images, labels, get_dataset_spec(dataset))
        assert len(masks) == len(model.pseudo_mask_names) == 3
        for mask in masks:
            assert bool((mask[..., :16] == IGNORE_INDEX).all()) is expect_white
            assert (mask[..., 16:] != IGNORE_INDEX).all()


def test_stage2_loss_weights_the_three_pseudo_masks_06_02_02():
    torch.manual_seed(0)
    model = WSSSTissue(num_classes=4, stage1_hparams=TINY, **TINY_SEGMENTER).train()
    assert not model.classifier.training and model.segmenter.training  # stage 1 frozen, BN included
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 3, 32, 32))
    torch.manual_seed(1)  # the same dropout draws in both forward passes
    loss, parts = model.loss(images, masks)
    expected = 0.6 * parts["ce_layer4"] + 0.2 * parts["ce_layer3"] + 0.2 * parts["ce_layer2"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    # Each term is the cross-entropy against its own mask, the ignored index left out.
    torch.manual_seed(1)
    with torch.no_grad():
        logits = model.segmenter(images)
    assert parts["ce_layer3"] == pytest.approx(float(torch.nn.functional.cross_entropy(
        logits, masks[:, 1], ignore_index=IGNORE_INDEX)), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in model.classifier.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.segmenter.parameters())


def test_gate_rejects_classes_the_classifier_puts_below_01():
    torch.manual_seed(0)
    model = WSSSTissue(num_classes=4, stage1_hparams=TINY, **TINY_SEGMENTER)
    with torch.no_grad():  # features are >= 0 after the last ReLU: class 0 sure, class 1 excluded
        weight = model.classifier.classifier.weight
        weight.zero_()
        weight[0] = 100.0
        weight[1] = -100.0
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    scores = model.predict(images)
    assert scores.shape == (2, 4, 32, 32)
    assert (scores[:, 1] == REJECTED_SCORE).all()
    torch.testing.assert_close(scores[:, [0, 2, 3]], torch.softmax(model.segmenter(images), 1)[:, [0, 2, 3]])


# --- through the engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_luad(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic-luad"
    make_synthetic_dataset("synthetic-luad", root, 12, 4, 2, size=32, seed=0)
    return root


def _history(experiment_dir) -> list[dict]:
    with open(experiment_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


SETTINGS = TrainSettings(epochs=3, batch_size=6, lr=1e-3, device="cpu", workers=0)


def test_engine_reclusters_sccam_between_epochs_and_resumes(tiny_luad, tmp_path):
    hparams = dict(TINY, subcategories=2, cam_epochs=1, round_epochs=(1, 2))
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 4})
    train("sc-cam", "synthetic-luad", tiny_luad, tmp_path / "run", tmp_path / "ckpt", seed=0,
          hparams=hparams, settings=settings)
    rows = _history(tmp_path / "run")
    assert [row["subcategory"] != "" for row in rows] == [False, True, True, True]
    model_file = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    # The model file is the schedule's final epoch; clusterings happened at the starts of epochs 2 and 3.
    assert model_file["epoch"] == 4 and int(model_file["state_dict"]["rounds_done"]) == 2

    # Preempted after the first round (epoch 2): the checkpoint brings the clustering state back, and
    # the rerun ends with the same result as the uninterrupted run.
    kept = train_preempted_after(2, "sc-cam", "synthetic-luad", tiny_luad, tmp_path / "resumed",
                                 tmp_path / "ckpt-resumed", seed=0, hparams=hparams, settings=settings)
    assert kept < 4
    train("sc-cam", "synthetic-luad", tiny_luad, tmp_path / "resumed", tmp_path / "ckpt-resumed", seed=0,
          hparams=hparams, settings=settings)
    assert [row["loss"] for row in _history(tmp_path / "resumed")] == [row["loss"] for row in rows]


def test_sccam_clusters_the_unaugmented_training_images_under_the_engines_wrapper(tiny_luad):
    """extract_feature.py: features of the plain training images, also when the loader's dataset is the
    engine's seeded, augmenting wrapper (EpochSeeded)."""
    torch.manual_seed(0)
    model = SCCAM(num_classes=4, subcategories=2, cam_epochs=1, round_epochs=(1,), **TINY)
    index = index_dataset(tiny_luad, get_dataset_spec("synthetic-luad"))
    augmented = EpochSeeded(ImageLabelDataset(index.train, augment=True), seed=0)
    features, _ = model.pooled_training_features(DataLoader(augmented, batch_size=4), CPU)
    plain = ImageLabelDataset(index.train)
    images = torch.stack([plain[i][0] for i in range(len(plain))])
    with torch.no_grad():
        expected = model.eval().features(normalised_batch(images, CPU)).float().mean(dim=(2, 3))
    torch.testing.assert_close(features, expected)
    assert augmented.dataset.augment  # the training loader's own dataset still augments


def test_engine_trains_wsss_tissue_in_two_stages_on_written_pseudo_masks(tiny_luad, tmp_path, caplog):
    entry = {"stage1": {"hparams": TINY}, "hparams": TINY_SEGMENTER}
    settings = TrainSettings(**{**SETTINGS.__dict__, "epochs": 2})
    record = train_like_the_workflow("wsss-tissue", "synthetic-luad", tiny_luad, tmp_path, entry, settings)

    # The pseudo masks on disk are the stage-1 classifier's, restricted to each image's labels.
    manifest = json.loads((tmp_path / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["masks"] == ["layer4", "layer3", "layer2"] and manifest["images"] == 12
    _, stage1 = load_model(tmp_path / "stage1" / "model.pt")
    index = index_dataset(tiny_luad, get_dataset_spec("synthetic-luad"))
    (image_path, label), = index.train[:1]
    image, target = ImageLabelDataset(index.train[:1])[0]
    expected = stage1.eval().pseudo_masks(normalised_batch(image[None], torch.device("cpu")), target[None],
                                          get_dataset_spec("synthetic-luad"))
    for kind, mask in zip(manifest["masks"], expected, strict=True):
        written = Image.open(tmp_path / "pseudo_masks" / kind / image_path.name)
        assert written.mode == "P"
        assert np.array_equal(np.asarray(written), mask[0].numpy())
        assert set(np.unique(np.asarray(written)).tolist()) <= {c for c in range(4) if label[c]} | {IGNORE_INDEX}

    rows = _history(tmp_path / "run")
    assert len(rows) == 2 and all(row["ce_layer4"] != "" for row in rows)
    assert record["stage1_model"] == tmp_path / "stage1" / "model.pt"
    model_file = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert model_file["hparams"]["stage1_hparams"] == TINY  # taken from the stage-1 model file
    # The gate uses the trained stage-1 classifier, not a fresh one.
    torch.testing.assert_close(model_file["state_dict"]["classifier.classifier.weight"],
                               stage1.state_dict()["classifier.weight"])

    # A second stage preempted, then its first stage retrained (another model file): the old second
    # stage's checkpoint is not resumed.
    stage2 = {"stage1_model": tmp_path / "stage1" / "model.pt", "pseudo_masks": tmp_path / "pseudo_masks"}
    train_preempted_after(1, "wsss-tissue", "synthetic-luad", tiny_luad, tmp_path / "rerun", tmp_path / "ckpt-rerun",
                          seed=0, hparams=TINY_SEGMENTER, settings=SETTINGS, **stage2)
    stage1_record = torch.load(tmp_path / "stage1" / "model.pt", weights_only=True)
    torch.save({**stage1_record, "val_mIoU": -1.0}, tmp_path / "stage1" / "model.pt")
    with caplog.at_level(logging.WARNING, logger="pathmamba.engine.train"):
        train("wsss-tissue", "synthetic-luad", tiny_luad, tmp_path / "rerun", tmp_path / "ckpt-rerun", 0,
              TINY_SEGMENTER, SETTINGS, **stage2)
    assert "belongs to other settings" in caplog.text


def test_wsss_tissue_second_stage_needs_its_own_first_stage(tiny_luad, tmp_path):
    with pytest.raises(ValueError, match="give stage1_model"):
        train("wsss-tissue", "synthetic-luad", tiny_luad, tmp_path / "run", tmp_path / "ckpt", 0, TINY_SEGMENTER,
              SETTINGS)
    train("wsss-tissue", "synthetic-luad", tiny_luad, tmp_path / "stage1", tmp_path / "ckpt1", 1, TINY,
          TrainSettings(**{**SETTINGS.__dict__, "epochs": 1}), stage=1)
    with pytest.raises(ValueError, match=r"\('wsss-tissue', 1, 'synthetic-luad', 1\); expected "
                                         r"\('wsss-tissue', 1, 'synthetic-luad', 0\)"):
        train("wsss-tissue", "synthetic-luad", tiny_luad, tmp_path / "run", tmp_path / "ckpt", 0, TINY_SEGMENTER,
              SETTINGS, stage1_model=tmp_path / "stage1" / "model.pt", pseudo_masks=tmp_path / "none")
    with pytest.raises(ValueError, match="'cam' has no stage 1; methods with a first stage"):
        train("cam", "synthetic-luad", tiny_luad, tmp_path / "cam", tmp_path / "ckpt-cam", 0, TINY, SETTINGS, stage=1)


def test_wsss_tissue_segmenter_loads_a_fetched_torchvision_resnet(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = WSSSTissue(num_classes=4, stage1_hparams=TINY, segmenter_encoder="resnet18",
                       segmenter_pretrained=str(path), decoder_channels=8)
    assert torch.equal(model.segmenter.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(FileNotFoundError, match=r"wsss-tissue: pretrained weights file .*missing\.pth"):
        WSSSTissue(num_classes=4, stage1_hparams=TINY, segmenter_encoder="resnet18",
                   segmenter_pretrained=str(tmp_path / "missing.pth"))
