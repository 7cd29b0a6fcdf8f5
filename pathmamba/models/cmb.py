"""The Contrastive Mamba Block encoder of PathMamba (paper Sec. 2.2, Eq. 1-2; docs/design.md §5.2).

Feature maps inside the encoder are channels-last, (B, H, W, C), as in VMamba, so LayerNorm and the
linear layers act on the last dimension; convolutions permute to (B, C, H, W) and back.

    PatchEmbed      (B, 3, H, W) -> (B, H/p, W/p, C0)
    CMBLayer        Eq. 1:  h^ = DCMamba(LN(h)) + h;  h = DeepConv(LN(h^)) + h^
    DCMamba         in-proj to (x, z); depthwise conv + SiLU on x; 4-direction cross-scan, selective
                    scan (S6), cross-merge; LayerNorm; * SiLU(z); * (1 + contrast map); out-proj
    PatchMerging    (B, h, w, C) -> (B, h/2, w/2, C') between stages
    contrast_map    Eq. 2, from the stage features P and a pixel-level saliency map M

Initialisation and regularisation follow the VMamba code the authors built on (VM-UNet's
``models/vmunet/vmamba.py``, ``VSSM``; also the authors' ``models/mamba.py``): every Linear
trunc_normal(std 0.02) with bias 0, LayerNorm weight 1 and bias 0 (:func:`vmamba_init_`), stochastic
depth growing linearly over the layers up to ``drop_path_rate`` (:class:`DropPath`), LayerNorm eps as
``VSSM`` passes it (``norm_layer=nn.LayerNorm``: PyTorch's 1e-5; ``VSSBlock``'s own default of 1e-6 is
overridden there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pathmamba.models.scan import cross_merge, cross_scan, selective_scan

#: VM-UNet's stochastic-depth rate (``configs/config_setting.py``, ``model_config["drop_path_rate"]``, and
#: the default of its ``VMUNet``), the VMamba setup the authors' ``models/mamba.py`` copies.
VMUNET_DROP_PATH_RATE = 0.2


def vmamba_init_(module: nn.Module, std: float = 0.02) -> None:
    """VMamba's ``VSSM._init_weights`` on every submodule: Linear weights trunc_normal(0, std) (cut at
    +-2 absolute, as timm's ``trunc_normal_``), Linear biases 0, LayerNorm weight 1 and bias 0.
    Convolutions and the state-space parameters (``x_proj_weight``, ``dt_projs_*``, ``A_logs``, ``Ds``,
    not Linear modules, as in VMamba where they are stacked into parameters) keep their own init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth (timm's ``DropPath``): in training, a residual branch's output (B, ...) is zeroed
    for a random fraction ``p`` of the samples and the others scaled by 1 / (1 - p); the identity in
    eval mode or at p = 0. Draws from torch's generator, which the engine seeds."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def contrast_map(
    features: torch.Tensor, saliency: torch.Tensor, q: float = 0.2, eta: float = 0.5, eps: float = 1e-6
) -> torch.Tensor:
    """Contrast correlation C of Eq. 2: (B, C, h, w) features, (B, 1, h, w) saliency -> (B, 1, h, w).

    A_s and A_w are the mean feature vectors over the top and the bottom fraction ``q`` of positions
    ranked by ``saliency`` (the vital and weak attention areas); then
    C = minmax2d(ReLU(cos(P, A_s) - eta * cos(P, A_w))^2), each image normalised to [0, 1] on its own.
    The saliency only selects positions, so no gradient flows into it. Computed in float32: under
    bf16 autocast the area means, cosines and the min-max scaling would otherwise be rounded to bf16's
    8 significant bits (ties in the saliency ranking, a coarse C); in float32 the casts are no-ops.
    """
    Bsz, Ch, h, w = features.shape
    P = features.float().flatten(2)
    s = saliency.float().reshape(Bsz, h * w)
    k = max(1, round(q * h * w))

    def area_mean(largest: bool) -> torch.Tensor:
        idx = s.topk(k, dim=1, largest=largest).indices
        return P.gather(2, idx[:, None].expand(-1, Ch, -1)).mean(2, keepdim=True)

    sim_strong = F.cosine_similarity(P, area_mean(True), dim=1, eps=eps)
    sim_weak = F.cosine_similarity(P, area_mean(False), dim=1, eps=eps)
    v = F.relu(sim_strong - eta * sim_weak).square()
    lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    # A flat map (hi == lo) gives C = 0: no position is singled out.
    return ((v - lo) / (hi - lo).clamp_min(eps)).view(Bsz, 1, h, w)


class DCMamba(nn.Module):
    """Dual-granularity Comparative Mamba: VMamba's SS2D with the contrast modulation y <- y * (1 + C).

    ``mixer="selective-scan"`` runs the 4-direction S6 scan; ``mixer="conv"`` replaces it by a depthwise
    ``conv_kernel`` x ``conv_kernel`` convolution (the pathmamba-noscan control), keeping everything else.
    """

    K = 4  # scan directions

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        mixer: str = "selective-scan",
        conv_kernel: int = 7,
        q: float = 0.2,
        eta: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
    ):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.d_inner, self.d_state, self.q, self.eta = d_inner, d_state, q, eta
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner)
        if mixer == "selective-scan":
            self._init_ssm(dt_min, dt_max)
        elif mixer == "conv":
            self.spatial = nn.Conv2d(d_inner, d_inner, conv_kernel, padding=conv_kernel // 2, groups=d_inner)
        else:
            raise ValueError(f"mixer={mixer!r}: choose 'selective-scan' or 'conv'")
        self.mixer = mixer
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _init_ssm(self, dt_min: float, dt_max: float) -> None:
        # Mamba's initialisation, one set per direction: A = -(1..N), D = 1, softplus(dt bias) spread
        # log-uniformly over [dt_min, dt_max] so that each channel starts with its own time scale.
        K, Di, N, R = self.K, self.d_inner, self.d_state, self.dt_rank
        bound = Di**-0.5
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, Di).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, Di, R).uniform_(-(R**-0.5), R**-0.5))
        dt = torch.exp(torch.rand(K, Di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(K * Di, 1))
        self.Ds = nn.Parameter(torch.ones(K * Di))
        # No weight decay on the state-space parameters (mamba_ssm's flag, read by pathmamba.engine.optim).
        for p in (self.dt_projs_bias, self.A_logs, self.Ds):
            p._no_weight_decay = True

    def _ss2d(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Di, H, W) -> (B, Di, H, W): the four directions folded into channels, one scan call."""
        Bsz, Di, H, W = x.shape
        K, N, L = self.K, self.d_state, H * W
        xs = cross_scan(x)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan(
            xs.reshape(Bsz, K * Di, L),
            dts.reshape(Bsz, K * Di, L),
            -torch.exp(self.A_logs.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.flatten().float(),
            delta_softplus=True,
        )
        return cross_merge(ys.view(Bsz, K, Di, H, W)).view(Bsz, Di, H, W)

    def forward(self, x: torch.Tensor, saliency: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, W, C), saliency (B, 1, H, W) or None (no modulation) -> (B, H, W, C)."""
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))
        y = self._ss2d(x) if self.mixer == "selective-scan" else self.spatial(x)
        y = self.out_norm(y.permute(0, 2, 3, 1)) * F.silu(z)
        if saliency is not None:
            c = contrast_map(y.permute(0, 3, 1, 2), saliency, self.q, self.eta)
            y = y * (1 + c.permute(0, 2, 3, 1))
        return self.out_proj(y)


class DeepConv(nn.Module):
    """Depthwise 3x3 convolution then a pointwise MLP, channels-last; keeps local detail (Fig. 2a)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(self.fc1(x)))


class CMBLayer(nn.Module):
    """One layer of Eq. 1 (phi, the flatten/transpose, is implicit in the channels-last layout).

    ``drop_path``: stochastic depth on both residual branches (VMamba's VSSBlock has one, DC-Mamba's;
    DeepConv's is a residual branch of the same block, dropped at the same rate as in Swin-style blocks).
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 **dc_mamba):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.dc_mamba = DCMamba(dim, **dc_mamba)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.deep_conv = DeepConv(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, h: torch.Tensor, saliency: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.drop_path(self.dc_mamba(self.norm1(h), saliency))
        return h + self.drop_path(self.deep_conv(self.norm2(h)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> C channels: (B, 3, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, dim: int, patch_size: int = 4, in_chans: int = 3, norm_eps: float = 1e-5):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging: (B, h, w, C) -> (B, ceil(h/2), ceil(w/2), C_out)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # odd grids (inputs not a multiple of 32) pad by one
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class CMBStage(nn.Module):
    """Optional patch merging, then one CMB layer per entry of ``drop_paths`` (its stochastic-depth
    rate), sharing the stage's saliency map."""

    def __init__(self, in_dim: int, dim: int, drop_paths: Sequence[float], downsample: bool,
                 norm_eps: float = 1e-5, **layer):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim, norm_eps) if downsample else None
        self.layers = nn.ModuleList(CMBLayer(dim, drop_path=p, norm_eps=norm_eps, **layer) for p in drop_paths)

    def forward(self, h: torch.Tensor, saliency: torch.Tensor | None = None) -> torch.Tensor:
        if self.downsample is not None:
            h = self.downsample(h)
        if saliency is not None:
            # the pixel-level map, averaged over each patch of this stage's grid
            saliency = F.adaptive_avg_pool2d(saliency, h.shape[1:3])
        for layer in self.layers:
            h = layer(h, saliency)
        return h


class CMBEncoder(nn.Module):
    """Patch embedding and the CMB stages: (B, 3, H, W) -> list of (B, H/(p 2^i), W/(p 2^i), dims[i]).

    ``saliency`` (B, 1, H, W) in [0, 1] switches the contrast modulation on in every layer; None runs
    the plain VMamba-style encoder. ``drop_path_rate``: the last layer's stochastic-depth rate, the
    earlier ones' growing linearly from 0 over all layers (VMamba's decay rule); ``init_std``: the Linear
    weights' std (:func:`vmamba_init_`); ``norm_eps``: the eps of the blocks', patch embedding's and
    patch merging's LayerNorms.
    """

    # VMamba's optimiser rule: no weight decay on 1-D parameters (norms, biases); pathmamba.engine.optim.
    _no_weight_decay_1d = True

    def __init__(
        self,
        dims=(96, 192, 384, 768),
        depths=(2, 2, 9, 2),
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = VMUNET_DROP_PATH_RATE,
        init_std: float = 0.02,
        norm_eps: float = 1e-5,
        **dc_mamba,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(dims[0], patch_size, norm_eps=norm_eps)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            CMBStage(dims[max(i - 1, 0)], dims[i], rates[starts[i]:starts[i] + depths[i]], i > 0,
                     norm_eps=norm_eps, mlp_ratio=mlp_ratio, **dc_mamba)
            for i in range(len(dims))
        )
        vmamba_init_(self, init_std)

    def forward(self, x: torch.Tensor, saliency: torch.Tensor | None = None) -> list[torch.Tensor]:
        h = self.patch_embed(x)
        feats = []
        for stage in self.stages:
            h = stage(h, saliency)
            feats.append(h)
        return feats
