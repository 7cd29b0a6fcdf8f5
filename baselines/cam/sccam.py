"""SC-CAM (Chang et al., CVPR 2020): sub-category exploration on top of the CAM classifier.

The images of each parent class are clustered (k-means on the classifier's pooled features) into
``subcategories`` sub-categories; a second 1x1 head over classes x sub-categories is trained jointly
with the parent head (parent BCE + ``sub_weight`` x sub-category BCE), which pushes the features to
separate the less discriminative parts of a class. The schedule is the original's (``script.sh``): a
plain CAM classifier for ``cam_epochs`` epochs, then one round per entry of ``round_epochs``, each
starting with a clustering by the model of the end of the previous phase; the final model is the last
epoch of the last round (:meth:`SCCAM.selectable_epoch`). Masks come from the parent head, as CAM
(optionally over SC-CAM's inference scales and flips, ``scales`` / ``flip``).

Sub-category labels (the original, github.com/Juliachang/SC-CAM: ``extract_feature.py`` then
``create_pseudo_label.py`` per round): each image's label is the cluster its eval-mode feature falls in,
computed once per round by the model that was clustered. The engine's loader yields no image identity,
so the model keeps that model's feature extractor, frozen in eval mode (``extractor``), and labels each
training batch by the nearest centroid of the extractor's pooled features: the same features the
clusters came from, up to the batch's flip/rotation augmentation.

``restart_each_round``: the original's ``script.sh`` trains every round from the ImageNet weights
(``train_cls.py --weights ${pretrained_model}``), with new heads; with this setting the backbone and both
heads return to their initial weights after each clustering (the engine's optimiser state is not reset).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.data import DataLoader

from baselines.cam.cam import CAMClassifier
from baselines.cam.classifier import image_logits
from pathmamba.data.datasets import normalised_batch, without_augmentation
from pathmamba.models.backbones import stage_channels


class SCCAM(CAMClassifier):
    """CAM classifier + sub-category head; ``predict`` is :class:`CAMClassifier`'s.

    Shapes: images (B, 3, H, W) -> features (B, F, h, w) -> parent logits (B, C) and sub-category
    logits (B, C * K), K = ``subcategories``; centroids (C, K, F).
    """

    def __init__(self, num_classes: int = 4, backbone: str = "resnet50", pretrained: str = "none",
                 output_stride: int = 8, width: int = 64, threshold: float = 0.5, subcategories: int = 10,
                 cam_epochs: int = 15, round_epochs: tuple[int, ...] = (31, 41, 51), sub_weight: float = 5.0,
                 kmeans_seed: int = 0, restart_each_round: bool = False, scales: tuple[float, ...] = (1.0,),
                 flip: bool = False):
        super().__init__(num_classes, backbone, pretrained, output_stride, width, threshold, scales, flip)
        round_epochs = tuple(int(length) for length in round_epochs)
        if subcategories < 1 or cam_epochs < 1 or not round_epochs or min(round_epochs) < 1:
            raise ValueError(f"sc-cam: subcategories and cam_epochs must be >= 1 and round_epochs one or more "
                             f"values >= 1, got {subcategories}, {cam_epochs}, {list(round_epochs)}")
        channels = stage_channels(backbone, width=width)[-1]
        self.num_classes, self.subcategories = num_classes, subcategories
        # Epochs (1-based) that start with a clustering: the first epoch of each round.
        self.clustering_epochs = tuple(cam_epochs + 1 + sum(round_epochs[:i]) for i in range(len(round_epochs)))
        self.final_epoch = cam_epochs + sum(round_epochs)
        self.sub_weight, self.kmeans_seed = sub_weight, kmeans_seed
        self.sub_classifier = nn.Conv2d(channels, num_classes * subcategories, kernel_size=1, bias=False)
        self.register_buffer("centroids", torch.zeros(num_classes, subcategories, channels))
        # A class with fewer training images than K gets fewer clusters; the rest are never assigned.
        self.register_buffer("centroid_valid", torch.zeros(num_classes, subcategories, dtype=torch.bool))
        self.register_buffer("rounds_done", torch.zeros((), dtype=torch.long))
        # The clustered model's features (copied in at each clustering), labelling the training batches.
        self.extractor = copy.deepcopy(self.features).requires_grad_(False).eval()
        self.restart_each_round = bool(restart_each_round)
        # Weights to restart from (ImageNet backbone, new heads); not in the state dict, rebuilt the same
        # way when a run resumes.
        self.initial_weights = ({name: tensor.clone() for name, tensor in self.state_dict().items()
                                 if name.split(".")[0] in ("features", "classifier", "sub_classifier")}
                                if self.restart_each_round else None)

    def selectable_epoch(self, epoch: int, epochs: int) -> bool:
        """Model selection keeps the last epoch of the last round only (pathmamba.engine.registry's ``SelectsEpochs``).

        The original's final model is a fixed epoch of its last round, taken without looking at val
        (``script.sh``: ``k10_R3_resnet_cls_ep50.pth``, the third round's ``train_cls.py``). The best val
        epoch over the whole run could be a plain CAM from before the first clustering, or an earlier
        round's model, since every round restarts. The config check makes ``epochs`` equal to
        ``cam_epochs + sum(round_epochs)`` (pathmamba.engine.config's schedule check).
        """
        return epoch == self.final_epoch

    def train(self, mode: bool = True):
        """The frozen extractor stays in eval mode, as the features it was clustered on."""
        super().train(mode)
        self.extractor.eval()
        return self

    def on_epoch_start(self, epoch: int, loader: DataLoader, device: torch.device, dataset: str) -> None:
        """Re-cluster at the start of each round (``clustering_epochs``), unless the round's clustering is
        done already (``rounds_done``, saved with the weights: a resumed run does not redo it)."""
        if epoch in self.clustering_epochs and int(self.rounds_done) <= self.clustering_epochs.index(epoch):
            features, labels = self.pooled_training_features(loader, device)
            self.cluster(features, labels)
            self.extractor.load_state_dict(self.features.state_dict())
            if self.restart_each_round:
                self.load_state_dict(self.initial_weights, strict=False)

    @torch.no_grad()
    def pooled_training_features(self, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (N, F) and labels (N, C) of every training image, in eval mode and without
        augmentation (as the original's ``extract_feature.py``)."""
        was_training = self.training
        self.eval()
        features, labels = [], []
        unaugmented = DataLoader(without_augmentation(loader.dataset), batch_size=loader.batch_size, shuffle=False)
        for images, targets in unaugmented:
            features.append(self.features(normalised_batch(images, device)).float().mean(dim=(2, 3)).cpu())
            labels.append(targets)
        self.train(was_training)
        return torch.cat(features), torch.cat(labels)

    def cluster(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """k-means per parent class over the images that carry it; features (N, F), labels (N, C)."""
        centroids = torch.zeros_like(self.centroids, device="cpu")
        valid = torch.zeros_like(self.centroid_valid, device="cpu")
        for c in range(self.num_classes):
            members = features[labels[:, c] > 0].double().numpy()
            k = min(self.subcategories, len(members))
            if k == 0:
                continue
            kmeans = KMeans(n_clusters=k, n_init=10, random_state=self.kmeans_seed + int(self.rounds_done))
            kmeans.fit(members)
            centroids[c, :k] = torch.from_numpy(kmeans.cluster_centers_).float()
            valid[c, :k] = True
        self.centroids.copy_(centroids)
        self.centroid_valid.copy_(valid)
        self.rounds_done += 1

    def subcategory_targets(self, pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Multi-hot sub-category labels (B, C * K): for each class of the image, its nearest valid
        centroid of that class; pooled (B, F), targets (B, C) multi-hot."""
        distances = torch.cdist(pooled.float(), self.centroids.flatten(0, 1)).view(len(pooled), *self.centroids.shape[:2])
        distances = distances.masked_fill(~self.centroid_valid, float("inf"))
        nearest = F.one_hot(distances.argmin(dim=2), self.subcategories).float()  # (B, C, K)
        return (nearest * targets[:, :, None]).flatten(1)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Parent BCE, plus ``sub_weight`` x sub-category BCE once a clustering exists."""
        features = self.features(images)
        parent = F.binary_cross_entropy_with_logits(image_logits(self.classifier(features)), targets)
        if int(self.rounds_done) == 0:
            return parent, {"parent": float(parent.detach())}
        with torch.no_grad():
            # float32 as the centroids it is compared with
            pooled = self.extractor(images).float().mean(dim=(2, 3))
        sub_logits = image_logits(self.sub_classifier(features))
        sub = F.binary_cross_entropy_with_logits(sub_logits, self.subcategory_targets(pooled, targets))
        loss = parent + self.sub_weight * sub
        return loss, {"parent": float(parent.detach()), "subcategory": float(sub.detach())}
