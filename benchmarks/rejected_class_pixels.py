"""Benchmark: how many scored test pixels each CAM-family model gives to a class its own image-level
prediction rejects (issue 18). After the class gate of ``baselines/cam/toolbox.py`` this must be 0.

For every ``runs/<dataset>/<method>/seed<k>/model.pt`` of an experiment folder whose method is in the CAM family,
the model predicts its dataset's test split as the evaluate job does (``model.predict``, argmax, white
background of the ground truth not scored). The kept classes of an image are the method's own:
probability >= its threshold (``threshold``; WSSS-Tissue: the stage-1 classifier at ``gate_threshold``),
plus the most probable class. HistoSegNet also reports the share of scored pixels whose CRF winner over
all its labels is background or "other" (the original's mask has no tissue class there; ours gives them
the best kept tissue class).

    python benchmarks/rejected_class_pixels.py --experiment-dir results/demo --data-root resources/datasets

Prints a markdown table: method, dataset, seeds, scored pixels, share given a rejected class, and for
HistoSegNet the share lost to background / other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from baselines.cam.histosegnet import HistoSegNet
from baselines.cam.toolbox import gate_classes, kept_classes
from baselines.cam.wsss_tissue import WSSSTissue
from pathmamba.data.datasets import ImageMaskDataset, normalised_batch
from pathmamba.data.readers import index_dataset
from pathmamba.data.specs import get_dataset_spec
from pathmamba.engine.evaluate import load_model

CAM_FAMILY = ("cam", "gradcam", "histosegnet", "sc-cam", "c-cam", "wsss-tissue")


def kept_by_the_model(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classes the model's own image-level prediction keeps: images (B, 3, H, W) -> (B, C) bool."""
    with torch.no_grad():
        if isinstance(model, WSSSTissue):
            return kept_classes(torch.sigmoid(model.classifier(images)), model.gate_threshold)
        return kept_classes(torch.sigmoid(model(images)), model.threshold)


def count_model(model: torch.nn.Module, loader: DataLoader) -> dict[str, int]:
    """Scored pixels, those given a rejected class, and (HistoSegNet) those whose CRF winner is
    background or "other", over a test loader of (image, mask, index)."""
    counts = {"scored": 0, "rejected": 0, "lost": 0}
    model.eval()
    for images, masks, _ in loader:
        images = normalised_batch(images, torch.device("cpu"))
        if isinstance(model, HistoSegNet):
            marginals, probabilities = model.crf_marginals(images)
            scores = gate_classes(marginals[:, : model.num_classes], probabilities, model.threshold)
            lost = marginals.argmax(1) >= model.num_classes
        else:
            with torch.no_grad():
                scores = model.predict(images)
            lost = torch.zeros_like(masks, dtype=torch.bool)
        predicted = scores.float().argmax(1)
        kept = kept_by_the_model(model, images)
        rejected = ~kept.gather(1, predicted.flatten(1)).view_as(predicted)
        scored = masks != model.num_classes  # the background index, after the tissue classes
        counts["scored"] += int(scored.sum())
        counts["rejected"] += int((rejected & scored).sum())
        counts["lost"] += int((lost & scored).sum())
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment-dir", type=Path, required=True, help="an experiment folder, e.g. results/demo")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="the folder holding one prepared dataset folder per dataset name, e.g. "
                             "resources/datasets")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for dataset_dir in sorted((args.experiment_dir / "runs").iterdir()):
        for method in CAM_FAMILY:
            models = sorted((dataset_dir / method).glob("seed*/model.pt"))
            if not models:
                continue
            spec = get_dataset_spec(dataset_dir.name)
            index = index_dataset(args.data_root / dataset_dir.name, spec)
            loader = DataLoader(ImageMaskDataset(index.test, spec), batch_size=args.batch_size)
            total = {"scored": 0, "rejected": 0, "lost": 0}
            for model_path in models:
                _, model = load_model(model_path)
                for key, value in count_model(model, loader).items():
                    total[key] += value
            lost = f"{100 * total['lost'] / total['scored']:.2f}%" if method == "histosegnet" else "—"
            rows.append(f"| {method} | {dataset_dir.name} | {len(models)} | {total['scored']} | "
                        f"{100 * total['rejected'] / total['scored']:.2f}% | {lost} |")
    print("| Method | Dataset | Seeds | Scored pixels | Rejected class | Lost to background/other |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
