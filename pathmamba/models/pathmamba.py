"""PathMamba (Fan et al., MICCAI 2024) and its ablation variants, as one model class with flags.

Shapes, for images (B, 3, H, W) and m classes (H, W multiples of 32 keep every grid exact):

    MIML branch     -> Y' (B, m, H, W) = sum_k w_k sigmoid(S_k), side maps S_k at strides 2/4/8   [use_miml]
                       (probabilities, as the authors' models/mil.py fuses them)
    saliency M      = max_c Y'  (B, 1, H, W)                                        [use_contrast]
    CMB encoder     -> 4 stage maps (B, H/4/2^i, W/4/2^i, dims[i]), contrast-modulated by M
    MLP decoder     -> Y'' logits (B, m, H, W)
    image level     Yhat = xi GM_r(Y') + (1 - xi) GM_r(sigmoid Y'')  (B, m)         (Eq. 3)
    loss            BCE(Yhat, y) + sum_k lambda_k BCE(GM_r(sigmoid S_k), y)          (Eq. 4, [use_dcl])
                    S_k: every MIML side map and a 1x1 classifier on every CMB stage
    predict         xi Y' + (1 - xi) sigmoid(Y''), minus 1 for classes with Yhat < gate

Without MIML, Yhat and the mask use Y'' alone. With ``use_contrast`` and no MIML (pathmamba-b-cmb) the
saliency comes from the CMB's own class maps: a first pass of encoder + decoder without modulation,
under no_grad, gives Y'' and M = max_c sigmoid(Y''); the second pass is modulated by it.
``mixer="conv"`` replaces the selective scan by a depthwise convolution (pathmamba-noscan).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pathmamba.models.cmb import VMUNET_DROP_PATH_RATE, CMBEncoder, vmamba_init_
from pathmamba.models.miml import MIMLBranch


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid in float32. Under bf16 autocast the logits come in bf16, and a bf16 sigmoid rounds to
    exactly 1 above a logit of about 6.2, where its gradient is then exactly 0: a confident class
    stops learning, even a wrong one. In float32 the cast is a no-op."""
    return torch.sigmoid(logits.float())


def gm_pool(p: torch.Tensor, r: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalized mean over the spatial dims: (B, C, H, W) probabilities -> (B, C).

    (mean p^r)^(1/r): the mean at r = 1, tending to the max as r grows. Computed in float32; the
    clamp keeps the gradient of the 1/r power finite where every pixel is near zero.
    """
    return p.float().clamp_min(eps).pow(r).mean((2, 3)).pow(1.0 / r)


def bce(p: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Binary cross-entropy of probabilities, in float32 (torch's BCE refuses to run under autocast)."""
    p = p.float().clamp(eps, 1 - eps)
    y = y.float()
    return -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean()


class MLPDecoder(nn.Module):
    """SegFormer's all-MLP head: per-stage linear to ``dim``, upsample to stage 1, concat, fuse, classify.

    Stage maps are channels-last (B, h_i, w_i, dims[i]); returns logits (B, m, h_1, w_1). LayerNorm rather
    than BatchNorm, so that the no-grad saliency pass of pathmamba-b-cmb leaves no running statistics.
    """

    # Part of the CMB branch: no weight decay on its 1-D parameters, as the encoder (pathmamba.engine.optim).
    _no_weight_decay_1d = True

    def __init__(self, dims: Sequence[int], dim: int, num_classes: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d, dim) for d in dims)
        self.fuse = nn.Linear(len(dims) * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[1:3]
        ups = [
            F.interpolate(proj(f).permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
            for proj, f in zip(self.proj, feats, strict=True)
        ]
        x = self.fuse(torch.cat(ups, dim=1).permute(0, 2, 3, 1))
        return self.classifier(F.gelu(self.norm(x))).permute(0, 3, 1, 2)


def _check(name: str, ok: bool, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"PathMamba: {name}={value!r} is invalid; allowed: {allowed}")


class PathMamba(nn.Module):
    """PathMamba with every hyper-parameter of docs/design.md §5 as a keyword (paper values as defaults).

    Flags select the variant: ``use_miml`` (pixel-level MIML branch), ``use_contrast`` (contrast
    modulation in DC-Mamba, Eq. 2), ``use_dcl`` (deep contrast supervision, Eq. 4), ``mixer``
    (the CMB's token mixer: "selective-scan" S6 or the "conv" depthwise control; the training setting
    ``scan`` picks the selective scan's implementation, not this).
    """

    def __init__(
        self,
        num_classes: int = 4,
        *,
        use_miml: bool = True,
        use_contrast: bool = True,
        use_dcl: bool = True,
        mixer: str = "selective-scan",
        # CMB encoder
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 9, 2),
        patch_size: int = 4,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        mlp_ratio: float = 4.0,
        conv_kernel: int = 7,
        q: float = 0.2,
        eta: float = 0.5,
        decoder_dim: int = 256,
        # VMamba's initialisation and regularisation of the CMB branch (cmb.py)
        drop_path_rate: float = VMUNET_DROP_PATH_RATE,
        init_std: float = 0.02,
        norm_eps: float = 1e-5,
        # MIML branch
        backbone: str = "resnet50",
        pretrained: str = "none",
        backbone_width: int = 64,
        side_weights: Sequence[float] = (0.2, 0.35, 0.45),
        side_strides: Sequence[int] = (2, 4, 8),
        # the authors' functions/train.py: the side classifiers at lr / 100
        side_lr_scale: float = 0.01,
        # prediction and loss
        gm_r: float = 4.0,
        xi: float = 0.5,
        gate: float = 0.1,
        # the authors' functions/train.py sums the side maps' BCEs unweighted; the stage weights are ours
        dcl_miml_weights: Sequence[float] = (1.0, 1.0, 1.0),
        dcl_stage_weights: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
    ):
        super().__init__()
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        _check("depths", len(depths) == len(dims) and min(depths) >= 1, depths, "one depth >= 1 per dim")
        _check("mixer", mixer in ("selective-scan", "conv"), mixer, "'selective-scan' or 'conv'")
        _check("q", 0 < q <= 0.5, q, "0 < q <= 0.5")
        _check("eta", 0 <= eta <= 1, eta, "0 <= eta <= 1")
        _check("xi", 0 <= xi <= 1, xi, "0 <= xi <= 1")
        _check("gm_r", gm_r >= 1, gm_r, ">= 1")
        _check("drop_path_rate", 0 <= drop_path_rate < 1, drop_path_rate, "0 <= drop_path_rate < 1")
        _check("init_std", init_std > 0, init_std, "> 0")
        _check("norm_eps", norm_eps > 0, norm_eps, "> 0")
        # A weights file for a variant without the MIML branch would be named in run.json but never loaded.
        _check("pretrained", use_miml or pretrained == "none", pretrained,
               "'none' when use_miml is false (the ResNet it initialises is the MIML branch's)")
        _check("side_weights", 1 <= len(side_weights) <= 5, side_weights, "1 to 5 weights (ResNet segments)")
        _check(
            "dcl_miml_weights",
            len(dcl_miml_weights) == len(side_weights),
            dcl_miml_weights,
            "one weight per side output (len(side_weights))",
        )
        _check(
            "dcl_stage_weights",
            len(dcl_stage_weights) == len(dims),
            dcl_stage_weights,
            "one weight per CMB stage (len(dims))",
        )
        self.use_miml, self.use_contrast, self.use_dcl = use_miml, use_contrast, use_dcl
        self.gm_r, self.xi, self.gate = float(gm_r), float(xi), float(gate)
        self.dcl_miml_weights = tuple(float(w) for w in dcl_miml_weights)
        self.dcl_stage_weights = tuple(float(w) for w in dcl_stage_weights)

        self.miml = (MIMLBranch(num_classes, backbone, pretrained, side_weights, backbone_width, side_strides,
                                side_lr_scale) if use_miml else None)
        self.encoder = CMBEncoder(
            dims,
            depths,
            patch_size,
            mlp_ratio,
            d_state=d_state,
            ssm_ratio=ssm_ratio,
            dt_rank=dt_rank,
            d_conv=d_conv,
            mixer=mixer,
            conv_kernel=conv_kernel,
            q=q,
            eta=eta,
            drop_path_rate=drop_path_rate,
            init_std=init_std,
            norm_eps=norm_eps,
        )
        self.decoder = MLPDecoder(dims, decoder_dim, num_classes)
        self.stage_classifiers = nn.ModuleList(nn.Linear(d, num_classes) for d in dims) if use_dcl else None
        # VMamba initialises its whole network this way, decoder and head included: so the CMB branch's
        # heads too (the encoder did its own; the MIML ResNet keeps torchvision's or ImageNet weights)
        vmamba_init_(self.decoder, init_std)
        if self.stage_classifiers is not None:
            vmamba_init_(self.stage_classifiers, init_std)
        if self.stage_classifiers is not None:
            # heads on the CMB stages: VMamba's no-decay rule for 1-D parameters, as encoder and decoder;
            # the MIML ResNet keeps the decay of every parameter, as the baselines' ResNets (pathmamba.engine.optim)
            self.stage_classifiers._no_weight_decay_1d = True

    def _cmb(self, images: torch.Tensor, saliency: torch.Tensor | None):
        feats = self.encoder(images, saliency)
        # upsampled in float32, as MIMLBranch's side logits: no second bf16 rounding under autocast
        y2 = F.interpolate(self.decoder(feats).float(), size=images.shape[-2:], mode="bilinear",
                           align_corners=False)
        return y2, feats

    def forward(self, images: torch.Tensor) -> dict:
        """``y1`` Y' and ``sides`` (MIML, else None): probabilities; ``y2`` Y'': logits (these three in
        float32, (B, m, H, W)); ``stages``: logits (B, m, h_i, w_i)."""
        y1 = sides = saliency = None
        if self.miml is not None:
            y1, sides = self.miml(images)
            if self.use_contrast:
                saliency = y1.amax(1, keepdim=True).detach()
        elif self.use_contrast:
            with torch.no_grad():
                saliency = probabilities(self._cmb(images, None)[0]).amax(1, keepdim=True)
        y2, feats = self._cmb(images, saliency)
        stages = None
        if self.stage_classifiers is not None:
            stages = [cls(f).permute(0, 3, 1, 2) for cls, f in zip(self.stage_classifiers, feats, strict=True)]
        return {"y1": y1, "sides": sides, "y2": y2, "stages": stages}

    def pixel_probs(self, out: dict) -> torch.Tensor:
        """(B, m, H, W): xi Y' + (1 - xi) sigmoid(Y''), or sigmoid(Y'') without MIML."""
        p2 = probabilities(out["y2"])
        if out["y1"] is None:
            return p2
        return self.xi * out["y1"] + (1 - self.xi) * p2

    def probability_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Y' (None without MIML) and sigmoid(Y''), each (B, m, H, W) in [0, 1]: the heat maps of the figures."""
        out = self(images)
        return {"y1": out["y1"], "y2": probabilities(out["y2"])}

    def image_probs(self, out: dict) -> torch.Tensor:
        """Eq. 3: (B, m) image-level class probabilities."""
        p2 = gm_pool(probabilities(out["y2"]), self.gm_r)
        if out["y1"] is None:
            return p2
        return self.xi * gm_pool(out["y1"], self.gm_r) + (1 - self.xi) * p2

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE of Eq. 3's prediction, plus the deep contrast supervision over side and stage maps."""
        out = self(images)
        main = bce(self.image_probs(out), targets)
        parts = {"bce": main.item()}
        if not self.use_dcl:
            return main, parts
        deep = [(w, probabilities(s)) for w, s in zip(self.dcl_stage_weights, out["stages"], strict=True)]
        if out["sides"] is not None:
            deep += zip(self.dcl_miml_weights, out["sides"], strict=True)  # already probabilities
        dcl = sum(w * bce(gm_pool(p, self.gm_r), targets) for w, p in deep)
        parts["dcl"] = dcl.item()
        return main + dcl, parts

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, m, H, W) scores; classes whose image probability is below ``gate`` drop by 1 and so lose
        the argmax to every class above it, keeping their order where all classes are gated off."""
        out = self(images)
        gated = (self.image_probs(out) < self.gate).float()
        return self.pixel_probs(out) - gated[:, :, None, None]


# The heat-map columns of PathMamba in the figures (the registry's ``heatmaps``).


def miml_heatmaps(model: PathMamba, images: torch.Tensor) -> torch.Tensor:
    """Y' of ``model``: the MIML branch's fused side probabilities, (B, m, H, W) in [0, 1]."""
    with torch.no_grad():
        return model.probability_maps(images)["y1"].float()


def cmb_heatmaps(model: PathMamba, images: torch.Tensor) -> torch.Tensor:
    """sigmoid(Y'') of ``model``: the CMB branch's class probabilities, (B, m, H, W) in [0, 1]."""
    with torch.no_grad():
        return model.probability_maps(images)["y2"].float()
