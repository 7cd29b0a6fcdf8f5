"""The method registry: every trainable method, by name.

Entries name their builder as ``"module:callable"`` and are imported only when built, so that listing
and validating method names (Snakefile start-up, config checks) never imports torch.

Every builder is called as ``builder(num_classes=..., **preset, **hparams)`` and returns a
:class:`torch.nn.Module` with two methods used by the engine (``pathmamba.engine.train``), the protocol
:class:`Method` that :func:`build_method` checks:

``loss(images, targets) -> (loss, parts)``
    images (B, 3, H, W) float, normalised; targets (B, C) float multi-hot for ``supervision="image"``,
    or (B, H, W) int64 with the background index C ignored for ``supervision="pixel"``; ``parts`` is a dict of
    floats logged per epoch.
``predict(images) -> scores``
    (B, C, H, W) float class scores, larger is more likely; the mask is ``scores.argmax(1)``.

Optional (:class:`EpochAware`): ``on_epoch_start(epoch, train_loader, device, dataset)``, called by the engine before each
epoch (1-based), also the first epoch after a resume; for state that changes between epochs (SC-CAM's
re-clustering, WSSS-Tissue's dropout threshold). That state must live in the model's buffers or be
recomputed from the weights, so that a resumed run equals an uninterrupted one.

Optional (:class:`SelectsEpochs`): ``selectable_epoch(epoch, epochs) -> bool``, the epochs that model
selection may keep (SC-CAM: its original's final model, not the best val epoch); see :func:`selectable_epoch`.

Optional (:class:`SelectsOnDevice`): ``selection_scores(images) -> scores``, what model selection ranks the
epochs by when ``predict`` has a step the model's device cannot run (HistoSegNet's dense CRF, on the CPU,
while the GPU would wait); ``predict`` still gives the masks of ``evaluate`` and ``predict``. See
:func:`selection_predictor`.

Two-stage methods (``MethodSpec.stage1``, WSSS-Tissue): the first stage is trained as a run of its own
(``build_method(name, stage=1)``, image supervision) whose model must also have (:class:`FirstStage`)
``pseudo_masks(images, targets, dataset) -> [(B, H, W) int64] * K`` and ``pseudo_mask_names`` (K folder
names); those masks of every training image are written once (``pathmamba.engine.pseudo_masks``), and the
method itself (``supervision="pseudo"``) trains on them: targets (B, K, H, W) int64. Its builder
receives ``stage1_hparams`` (the first stage's keywords) and its model has ``init_from_stage1(state_dict)``
(:class:`SecondStage`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the registry itself never imports torch (see above)
    import torch
    from torch.utils.data import DataLoader

    from pathmamba.data.specs import DatasetSpec


@runtime_checkable
class Method(Protocol):
    """What the engine trains and scores (shapes in the module docstring)."""

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]: ...

    def predict(self, images: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class EpochAware(Protocol):
    """A method with state that changes between epochs; the engine calls this before each epoch."""

    def on_epoch_start(self, epoch: int, train_loader: DataLoader, device: torch.device, dataset: str) -> None: ...


@runtime_checkable
class SelectsEpochs(Protocol):
    """A method whose original keeps a fixed epoch rather than the best on val: model selection may keep
    only the epochs for which this returns True (1-based ``epoch`` of ``epochs``)."""

    def selectable_epoch(self, epoch: int, epochs: int) -> bool: ...


def selectable_epoch(model: object, epoch: int, epochs: int) -> bool:
    """Whether the engine's model selection may keep ``epoch`` (1-based) of ``epochs``: every epoch of a
    method without :class:`SelectsEpochs`; the final epoch always, so that every run ends with a model."""
    return epoch == epochs or not isinstance(model, SelectsEpochs) or model.selectable_epoch(epoch, epochs)


@runtime_checkable
class SelectsOnDevice(Protocol):
    """A method whose ``predict`` ends in a step off the model's device: model selection scores the val
    images with ``selection_scores`` instead, (B, C, H, W) like ``predict``, all on the device."""

    def selection_scores(self, images: torch.Tensor) -> torch.Tensor: ...


def selection_predictor(model: object):
    """What the engine's model selection predicts with: ``selection_scores`` of a :class:`SelectsOnDevice`
    method, ``predict`` of every other."""
    return model.selection_scores if isinstance(model, SelectsOnDevice) else model.predict


@runtime_checkable
class FirstStage(Method, Protocol):
    """The first stage of a two-stage method: it also writes pseudo masks of the training images."""

    pseudo_mask_names: tuple[str, ...]

    def pseudo_masks(self, images: torch.Tensor, targets: torch.Tensor, dataset: DatasetSpec) -> list[torch.Tensor]: ...


@runtime_checkable
class SecondStage(Method, Protocol):
    """A two-stage method itself: it starts from its trained first stage's weights."""

    def init_from_stage1(self, state_dict: dict[str, torch.Tensor]) -> None: ...


#: The kinds of supervision a method trains with, as the tables' Supervision column names them: a method
#: trained on its own first stage's pseudo masks has seen image labels only.
SUPERVISION_KINDS = {"image": "weak (image labels)", "pseudo": "weak (image labels)", "pixel": "full (pixel masks)"}


@dataclass(frozen=True)
class AblationRow:
    """A method's row in Table 2 (PathMamba's ablation) and in the ablation figure: rows are ordered by
    ``position``; ``note`` is a footnote of Table 2 about this row (a control beyond the paper, a variant
    that computes something differently)."""

    position: int
    note: str = ""


@dataclass(frozen=True)
class HeatMap:
    """One column of the heat-map figure (pathmamba/reporting/plots.py) for a method's model: ``maps`` names the
    function as ``"module:callable"``, called as ``maps(model, images) -> (B, C, H, W)`` float maps in
    [0, 1] (images as the engine gives them); ``title`` names the map under the method's name, ``scaling``
    says how it is brought to [0, 1] (the colour bar's legend)."""

    maps: str
    title: str
    scaling: str


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method, what supervision it trains with, and how the tables and figures show it.

    ``supervision``: ``image`` labels, ``pixel`` masks of val, or ``pseudo`` masks written by its first
    stage, ``stage1`` (:data:`SUPERVISION_KINDS`). ``epochs_from``: builder keywords whose values (numbers
    or lists of numbers) add up to the method's training epochs, for a method with a schedule of its own
    (SC-CAM's CAM phase and rounds); the config check holds ``train.epochs`` to it.

    For the tables (pathmamba/reporting/tables.py) and figures (pathmamba/reporting/plots.py): ``note``, a footnote that readers
    of every table with this row must see (an approximation, another training set); ``reference``, set for
    a Table 1 row beyond the paper, kept as a reference: what the row shows; ``baseline``, a comparison
    method described against its original code in docs/baselines.md (Table 1 points there); ``ablation``,
    its row of Table 2 (None: not in it); ``heatmaps``, its columns of the heat-map figure (none: not shown).
    """

    target: str
    supervision: str = "image"
    summary: str = ""
    preset: dict[str, Any] = field(default_factory=dict)
    stage1: MethodSpec | None = None
    epochs_from: tuple[str, ...] = ()
    note: str = ""
    reference: str = ""
    baseline: bool = False
    ablation: AblationRow | None = None
    heatmaps: tuple[HeatMap, ...] = ()

    def __post_init__(self) -> None:
        if self.supervision not in SUPERVISION_KINDS:
            raise ValueError(f"{self.target}: supervision {self.supervision!r}; expected one of "
                             f"{', '.join(SUPERVISION_KINDS)}")


#: The builder of PathMamba and its ablation variants (the ``mamba`` model family of the GPU-hour floor).
PATHMAMBA_TARGET = "pathmamba.models.pathmamba:PathMamba"
#: The CAM family's class activation maps as their predictions scale them.
_CAM_HEATMAP = HeatMap("baselines.cam.toolbox:class_activation_heatmaps", "class activation map",
                       "CAM: ReLU, divided by its maximum")

METHODS: dict[str, MethodSpec] = {
    "cam": MethodSpec(
        "baselines.cam.cam:CAMClassifier",
        summary="Class activation maps of a multi-label ResNet classifier (Zhou et al., CVPR 2016)",
        reference="the class activation maps every CAM-family method builds on",
        baseline=True,
        heatmaps=(_CAM_HEATMAP,),
    ),
    "gradcam": MethodSpec(
        "baselines.cam.gradcam:GradCAMClassifier",
        summary="Grad-CAM of a multi-label ResNet classifier, every class from one forward (Selvaraju et al., ICCV 2017)",
        reference="with global average pooling and a linear classifier, Grad-CAM of the last layer equals CAM",
        baseline=True,
        heatmaps=(HeatMap("baselines.cam.gradcam:last_layer_grad_cam", "Grad-CAM", "Grad-CAM: min-max scaled"),),
    ),
    "histosegnet": MethodSpec(
        "baselines.cam.histosegnet:HistoSegNet",
        summary="Grad-CAM + white-background and 'other' maps + class subtraction + dense CRF "
                "(Chan et al., ICCV 2019)",
        baseline=True,
        heatmaps=(HeatMap("baselines.cam.histosegnet:histosegnet_grad_cam", "Grad-CAM",
                          "HistoSegNet's Grad-CAM: divided by its maximum"),),
    ),
    "unet": MethodSpec(
        "baselines.unet:UNet",
        supervision="pixel",
        summary="Fully supervised UNet (smp, ResNet-50 encoder), cross-entropy; trained on the val masks "
                "(the only public pixel labels) with a fixed 80/20 split of val for model selection",
        note="unet is fully supervised: pixel masks exist only for val/test, so it trains on the val masks (a "
             "fixed 80/20 split of val for model selection).",
        baseline=True,
    ),
    "sc-cam": MethodSpec(
        "baselines.cam.sccam:SCCAM",
        summary="CAM + k-means sub-category head, re-clustered in rounds (Chang et al., CVPR 2020)",
        epochs_from=("cam_epochs", "round_epochs"),
        baseline=True,
        heatmaps=(_CAM_HEATMAP,),
    ),
    "c-cam": MethodSpec(
        "baselines.cam.ccam:CCAM",
        summary="Causal CAM: category chain + anatomy chain with the tissue mask as prior (Chen et al., CVPR 2022)",
        note="c-cam's anatomy prior is the tissue / white-background mask (an approximation).",
        baseline=True,
        heatmaps=(_CAM_HEATMAP,),
    ),
    "wsss-tissue": MethodSpec(
        "baselines.cam.wsss_tissue:WSSSTissue",
        supervision="pseudo",
        summary="DeepLabV3+ on multi-layer Grad-CAM pseudo masks of a classifier trained with progressive "
                "dropout attention (Han et al., MedIA 2022)",
        baseline=True,
        stage1=MethodSpec(
            "baselines.cam.wsss_tissue:WSSSTissueClassifier",
            summary="WSSS-Tissue stage 1: multi-label classifier with progressive dropout attention",
        ),
    ),
    # PathMamba's ablation (paper Table 2, rows a, b, c, d, f) and a control: one class, flags in the preset.
    "pathmamba-b": MethodSpec(
        PATHMAMBA_TARGET,
        summary="PathMamba baseline (Table 2 a): VMamba-style encoder + MLP head, plain selective scan",
        preset={"use_miml": False, "use_contrast": False, "use_dcl": False, "mixer": "selective-scan"},
        ablation=AblationRow(1),
    ),
    "pathmamba-b-miml": MethodSpec(
        PATHMAMBA_TARGET,
        summary="PathMamba baseline + MIML pixel-level branch (Table 2 b)",
        preset={"use_miml": True, "use_contrast": False, "use_dcl": False, "mixer": "selective-scan"},
        ablation=AblationRow(2),
    ),
    "pathmamba-b-cmb": MethodSpec(
        PATHMAMBA_TARGET,
        summary="PathMamba baseline + Contrastive Mamba Block, contrast from its own class maps (Table 2 c)",
        preset={"use_miml": False, "use_contrast": True, "use_dcl": False, "mixer": "selective-scan"},
        ablation=AblationRow(3, note="c (pathmamba-b-cmb) has no MIML branch to give the CMB its saliency map: it "
                                     "runs its CMB network twice per image, a first pass without modulation (no "
                                     "gradient) whose class maps give the saliency, then the modulated pass that "
                                     "is trained and scored."),
    ),
    "pathmamba-b-miml-cmb": MethodSpec(
        PATHMAMBA_TARGET,
        summary="PathMamba baseline + MIML + Contrastive Mamba Block (Table 2 d)",
        preset={"use_miml": True, "use_contrast": True, "use_dcl": False, "mixer": "selective-scan"},
        ablation=AblationRow(4),
    ),
    "pathmamba": MethodSpec(
        PATHMAMBA_TARGET,
        summary="PathMamba: MIML + Contrastive Mamba Block + Deep Contrast Supervised Loss (Fan et al., MICCAI 2024)",
        preset={"use_miml": True, "use_contrast": True, "use_dcl": True, "mixer": "selective-scan"},
        ablation=AblationRow(5),
        # its variants' maps would double the figure
        heatmaps=(HeatMap("pathmamba.models.pathmamba:miml_heatmaps", "Y\u2032 (MIML fused map)", "Y\u2032: sigmoid"),
                  HeatMap("pathmamba.models.pathmamba:cmb_heatmaps", "Y\u2033 (CMB map)", "Y\u2033: sigmoid")),
    ),
    "pathmamba-noscan": MethodSpec(
        PATHMAMBA_TARGET,
        summary="Control: full PathMamba with the selective scan replaced by a depthwise 7x7 convolution",
        preset={"use_miml": True, "use_contrast": True, "use_dcl": True, "mixer": "conv"},
        ablation=AblationRow(6, note="pathmamba-noscan is a control beyond the paper (selective scan replaced by a "
                                     "depthwise convolution)."),
    ),
}


def method_names() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(METHODS)


def ablation_methods() -> list[str]:
    """Names of the methods with a row in Table 2 (:class:`AblationRow`), in their rows' order."""
    return sorted((name for name in METHODS if METHODS[name].ablation is not None),
                  key=lambda name: METHODS[name].ablation.position)


def load_target(target: str) -> Any:
    """The object that ``target`` (``"module:callable"``) names, its module imported now."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def two_stage_methods() -> list[str]:
    """Names of the registered methods that train a first stage of their own, sorted."""
    return [name for name in method_names() if METHODS[name].stage1 is not None]


def training_stages(name: str) -> tuple[int | None, ...]:
    """The stages method ``name`` trains, in the order they run: ``(1, None)`` (its first stage, then the
    method itself) for a two-stage method, else ``(None,)``."""
    return (1, None) if METHODS[name].stage1 is not None else (None,)


def get_spec(name: str, stage: int | None = None) -> MethodSpec:
    """The spec of ``name`` (``stage=1``: of its first stage); an unknown name raises ``KeyError`` listing
    the valid names, ``stage=1`` of a one-stage method a ``ValueError`` listing the two-stage ones."""
    try:
        spec = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(method_names())}") from None
    if stage is None:
        return spec
    if stage != 1 or spec.stage1 is None:
        raise ValueError(f"method {name!r} has no stage {stage}; methods with a first stage (stage 1): "
                         f"{', '.join(two_stage_methods())}")
    return spec.stage1


def required_protocol(name: str, stage: int | None = None) -> type:
    """The protocol that the model of ``name`` (``stage=1``: of its first stage) must follow."""
    if stage == 1:
        return FirstStage
    return SecondStage if get_spec(name).stage1 is not None else Method


def build_method(name: str, num_classes: int, stage: int | None = None, **hparams: Any):
    """Build method ``name`` (``stage=1``: its first stage) for ``num_classes`` classes; ``hparams``
    override the builder's defaults, never the preset's keys (``ValueError``). A model that lacks what the engine calls (:func:`required_protocol`)
    raises ``TypeError`` naming the builder and the protocol."""
    spec = get_spec(name, stage)
    fixed = sorted(set(hparams) & set(spec.preset))
    if fixed:
        # the preset is what makes this method this variant; an override would train another one under its name
        raise ValueError(f"method {name!r}: {', '.join(fixed)} fixed by its registry preset "
                         f"({', '.join(f'{k}={spec.preset[k]!r}' for k in fixed)}); hparams cannot override it")
    model = load_target(spec.target)(num_classes=num_classes, **{**spec.preset, **hparams})
    protocol = required_protocol(name, stage)
    if not isinstance(model, protocol):
        raise TypeError(f"{spec.target} built {type(model).__name__}, which does not follow the "
                        f"{protocol.__name__} protocol of pathmamba/engine/registry.py")
    return model
