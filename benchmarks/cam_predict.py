"""Benchmark: Grad-CAM's and HistoSegNet's ``predict`` and HistoSegNet's model-selection pass, before and
after issue 27, side by side in one process.

The paper's setting of both methods (ResNet-50 at output stride 8, 4 classes, HistoSegNet's CRF settings
of ``config/config.yaml``) on synthetic tissue patches of 224 px, BCSS-WSSS's patch size; seeded random
weights (the cost does not depend on training). The implementations replaced are kept below, for this
comparison only:

- **gradcam, before**: pytorch-grad-cam, the whole forward and a backward for every class, and one more
  forward for the class probabilities. **After**: one float32 forward serves every class's gradient
  (``grad_cam_maps``), plus the probabilities' forward under the caller's autocast, as before.
- **histosegnet, before**: the class probabilities from a backbone pass of their own, the Grad-CAM from
  a second. **After**: one backbone pass for both (``label_maps``).
- **histosegnet selection pass, before**: ``predict``, the dense CRF included, image by image on one CPU
  core. **After**: ``selection_scores``, the CRF's input maps, computed on the model's device.

``predict``'s masks before and after are compared pixel by pixel. The second table splits HistoSegNet's
per-image cost into the device part (backbone, Grad-CAM, maps) and the CRF, and scales both to one
BCSS-WSSS selection pass (3,418 val images) and to a job's 100 of them.

    python -m benchmarks.cam_predict                 # 4 images, 3 repeats (about 2 minutes on 2 cores)
    python -m benchmarks.cam_predict --images 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import yaml
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from baselines.cam.crf import dense_crf
from baselines.cam.gradcam import GradCAMClassifier
from baselines.cam.histosegnet import (
    HistoSegNet,
    to_rgb255,
)
from baselines.cam.toolbox import gate_classes
from pathmamba.core.layout import REPO
from pathmamba.data.datasets import normalised_batch
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_patch

BCSS_VAL_IMAGES = 3418
EPOCHS = 100
PAPER = {"backbone": "resnet50", "pretrained": "none", "output_stride": 8, "num_classes": 4}


# --- the implementations replaced (before issue 27), for comparison only ---------------------------------


def package_grad_cam(model, images: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's GradCAM of every class at layer4: one forward and backward per class."""
    images = images.float()
    requires_grad = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in model.features[-1].parameters():
            parameter.requires_grad_(True)
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False), \
                GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
            maps = [cam(input_tensor=images, targets=[ClassifierOutputTarget(c)] * len(images))
                    for c in range(model.num_classes)]
    finally:
        for parameter, flag in requires_grad.items():
            parameter.requires_grad_(flag)
        model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.stack(maps, axis=1)).to(images.device)


class GradCAMBefore(GradCAMClassifier):
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        with torch.no_grad():
            probabilities = torch.sigmoid(self(images.float()))
        return gate_classes(package_grad_cam(self, images), probabilities, self.threshold)


class HistoSegNetBefore(HistoSegNet):
    def label_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Before: the probabilities came from a backbone pass of their own, the Grad-CAM from another.
        self.eval()
        with torch.no_grad():
            self(images.float())
        return super().label_maps(images)


# --- measuring -----------------------------------------------------------------------------------------


def synthetic_batch(n: int, size: int) -> torch.Tensor:
    """n synthetic tissue patches (the project's generator), normalised as the engine feeds them."""
    rng = np.random.default_rng(0)
    spec = get_dataset_spec("synthetic-luad")
    images = np.stack([make_patch(rng, spec, size)[0] for _ in range(n)])
    return normalised_batch(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.device("cpu"))


def paired(before_class, after_class, **hparams):
    """(before, after) models with the same seeded weights, in eval mode."""
    torch.manual_seed(0)
    after = after_class(**PAPER, **hparams).eval()
    before = before_class(**PAPER, **hparams).eval()
    before.load_state_dict(after.state_dict())
    return before, after


def median_seconds(fns, repeats: int) -> list[float]:
    """Median seconds of each function, the functions run in turn so that other load falls on all alike."""
    runs = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for fn, seconds in zip(fns, runs, strict=True):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in runs]


def crf_seconds(model: HistoSegNet, images: torch.Tensor, repeats: int) -> float:
    """Median seconds of the CRF alone over the batch, on the label maps ``predict`` gives it."""
    maps, _ = model.label_maps(images)
    rgb = to_rgb255(images).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    maps = maps.numpy()

    def run():
        for image, label_maps in zip(rgb, maps, strict=True):
            present = label_maps.sum(axis=(1, 2)) > 0
            dense_crf(np.ascontiguousarray(image), label_maps[present], model.crf_settings)

    return median_seconds([run], repeats)[0]


def compare_masks(before: torch.Tensor, after: torch.Tensor) -> str:
    """Whether the argmax masks of two (B, C, H, W) scores agree; where they do not, how close the top
    two scores of ``before`` were there (a float-rounding tie flips, nothing else should)."""
    differ = before.argmax(1) != after.argmax(1)
    if not differ.any():
        return f"yes, all {differ.numel()} pixels"
    top2 = before.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1])[differ].max().item()
    return (f"{differ.sum().item()} of {differ.numel()} pixels differ, each a tie to float precision "
            f"(top two scores within {margin:.1e}); largest score difference "
            f"{(before - after).abs().max().item():.1e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4, help="images per batch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)  # as the engine's evaluation; Grad-CAM enables gradients itself
    images = synthetic_batch(args.images, args.size)
    n = len(images)
    hsn_hparams = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["methods"]["histosegnet"]["hparams"]
    hsn_hparams = {k: v for k, v in hsn_hparams.items() if k in ("threshold", "other_scale", "background_scale",
                                                                    "background_sigma", "crf")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} images of {args.size} px, "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f}\n", flush=True)

    rows = []
    gradcam_before, gradcam_after = paired(GradCAMBefore, GradCAMClassifier)
    hsn_before, hsn_after = paired(HistoSegNetBefore, HistoSegNet, **hsn_hparams)
    seconds = {
        "gradcam predict": median_seconds([lambda: gradcam_before.predict(images),
                                           lambda: gradcam_after.predict(images)], args.repeats),
        # before, the selection pass was predict itself
        "histosegnet": median_seconds([lambda: hsn_before.predict(images), lambda: hsn_after.predict(images),
                                       lambda: hsn_after.selection_scores(images)], args.repeats),
    }
    hsn_before_s, hsn_after_s, selection_s = seconds["histosegnet"]
    cases = [
        ("gradcam predict", *seconds["gradcam predict"],
         compare_masks(gradcam_before.predict(images), gradcam_after.predict(images))),
        ("histosegnet predict", hsn_before_s, hsn_after_s,
         compare_masks(hsn_before.predict(images), hsn_after.predict(images))),
        ("histosegnet selection pass", hsn_before_s, selection_s,
         "by design not: before, predict's masks (after the CRF); after, the CRF's input maps"),
    ]
    for name, b, a, masks in cases:
        rows.append(f"| {name} | {n / b:.2f} | {n / a:.2f} | {b / a:.1f} | {masks} |")
        print(rows[-1], flush=True)

    crf = crf_seconds(hsn_after, images, args.repeats) / n
    device_before = hsn_before_s / n - crf
    device_after = selection_s / n
    split = []
    for what, per_image in [("device part before (two backbone passes)", device_before),
                            ("device part after (one backbone pass)", device_after),
                            ("dense CRF (one CPU core, before only)", crf),
                            ("selection pass before", device_before + crf),
                            ("selection pass after", device_after)]:
        split.append(f"| {what} | {per_image * 1e3:.0f} | {per_image * BCSS_VAL_IMAGES / 60:.1f} | "
                     f"{per_image * BCSS_VAL_IMAGES * EPOCHS / 3600:.1f} |")
    print(
        "\n\n| case | before images/s | after images/s | speed-up | same masks |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\n| HistoSegNet, per image on this machine | ms | min per BCSS-WSSS val pass ({BCSS_VAL_IMAGES} "
        f"images) | h per job ({EPOCHS} passes) |\n|---|---|---|---|\n" + "\n".join(split)
    )


if __name__ == "__main__":
    main()
