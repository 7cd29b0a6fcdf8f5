"""The figures of a run, each written as PNG and PDF (matplotlib/seaborn, colour-blind-safe palette).

(a) :func:`qualitative_grid`  image, ground truth and each method's predicted mask (like the paper's Fig. 3)
(b) :func:`seed_spread`       mIoU of every seed per method and dataset, box + dots, the paper's value marked
(c) :func:`ablation_steps`    PathMamba's ablation (Table 2) as a step chart
(d) :func:`training_curves`   training loss and validation mIoU per epoch, mean over seeds with a ±std band
(e) :func:`compute_cost`      training hours per method from the Snakemake ``benchmark:`` files

Every function draws whatever finished and writes its files even when nothing did (an axis that says
so), so that the figures of a partial grid exist too.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pathmamba.data.readers import index_dataset, read_image, read_mask
from pathmamba.data.specs import get_dataset_spec
from pathmamba.layout import TRIVIAL, benchmark_path, run_path
from pathmamba.results import Grid, finished_runs, load_metrics
from pathmamba.tables import ABLATION

PALETTE = sns.color_palette("colorblind")
DPI = 150
GRID_CELL_INCHES = 1.4
GRID_LEGEND_INCHES = 0.6
GRID_LABEL_INCHES = 0.15
PAPER_MARKER = {"marker": "D", "color": "black", "markersize": 7, "linestyle": "none"}


def save_figure(figure, stem: Path, tight: bool = True) -> list[Path]:
    """Write ``figure`` to ``stem``.png and ``stem``.pdf and close it; returns the two paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        figure.savefig(tmp, dpi=DPI, bbox_inches="tight" if tight else None)
        tmp.replace(path)
    plt.close(figure)
    return paths


def _method_colours(methods: list[str]) -> dict[str, tuple]:
    return {method: PALETTE[i % len(PALETTE)] for i, method in enumerate(methods)}


def _nothing_to_show(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, fontsize=9, color="0.4")
    axis.set_xticks([])
    axis.set_yticks([])


def grid_pixel_size(n_images: int, n_methods: int) -> tuple[int, int]:
    """(width, height) in pixels of the qualitative grid PNG for ``n_images`` rows and ``n_methods``."""
    width = (2 + n_methods) * GRID_CELL_INCHES + GRID_LABEL_INCHES
    height = max(n_images, 1) * GRID_CELL_INCHES + GRID_LEGEND_INCHES
    return round(width * DPI), round(height * DPI)


def colour_mask(mask: np.ndarray, palette) -> np.ndarray:
    """(H, W) class indices 0..4 -> (H, W, 3) uint8 RGB in the dataset's palette."""
    return np.asarray(palette, dtype=np.uint8)[mask]


def qualitative_grid(dataset: str, data_root: Path, run_dir: Path, methods: list[str], seeds: list[int],
                     stem: Path, n_images: int = 4) -> list[Path]:
    """Rows: the first ``n_images`` test images by file name (those whose masks evaluation saves).
    Columns: image, ground truth, then each method's predicted mask from its first finished seed
    (the seed named in the column title). Masks in the dataset's palette, with a legend; white =
    background, not scored. The PNG has exactly :func:`grid_pixel_size` pixels."""
    spec = get_dataset_spec(dataset)
    test = sorted(index_dataset(Path(data_root), spec).test, key=lambda pair: pair[0].name)[:n_images]
    columns = []
    for method in methods:
        found = [seed for seed in seeds if (run_path(run_dir, dataset, method, seed) / "masks").is_dir()]
        columns.append((method, found[0] if found else None))
    width, height = grid_pixel_size(len(test), len(methods))
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    legend_fraction = GRID_LEGEND_INCHES / (height / DPI)
    axes = figure.subplots(max(len(test), 1), 2 + len(methods), squeeze=False,
                           gridspec_kw={"left": GRID_LABEL_INCHES / (width / DPI), "right": 0.99, "top": 0.97 - 0.1 * legend_fraction,
                                            "bottom": legend_fraction, "wspace": 0.04, "hspace": 0.04})
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    titles = ["image", "ground truth"] + [method if seed is None else f"{method} (seed {seed})"
                                          for method, seed in columns]
    for axis, title in zip(axes[0], titles, strict=True):
        axis.set_title(title, fontsize=6)
    if not test:
        _nothing_to_show(axes[0, 0], f"no test images in {data_root}")
    for row, (image_path, mask_path) in enumerate(test):
        axes[row, 0].imshow(read_image(image_path))
        axes[row, 1].imshow(colour_mask(read_mask(mask_path, spec), spec.palette))
        axes[row, 0].set_ylabel(image_path.stem[:18], fontsize=5)
        for col, (method, seed) in enumerate(columns, start=2):
            predicted = None if seed is None else run_path(run_dir, dataset, method, seed) / "masks" / image_path.name
            if predicted is not None and predicted.exists():
                axes[row, col].imshow(colour_mask(read_mask(predicted, spec), spec.palette))
            else:
                _nothing_to_show(axes[row, col], "not run" if seed is None else "mask not saved")
    handles = [Patch(facecolor=np.array(rgb) / 255, edgecolor="0.3", label=name)
               for name, rgb in zip([*spec.classes, "background (not scored)"], spec.palette, strict=True)]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=6, frameon=False)
    return save_figure(figure, stem, tight=False)


def seed_spread(metrics: pd.DataFrame, paper: dict, datasets: list[str], methods: list[str], stem: Path,
                metric: str = "mIoU") -> list[Path]:
    """One panel per dataset: ``metric`` of each seed (dots) and their box per method; the paper's
    value as a black diamond. metrics: rows of :func:`pathmamba.results.load_metrics`;
    paper: ``{dataset: {method: {metric: value}}}``."""
    figure, axes = plt.subplots(1, len(datasets), figsize=(1.2 + 0.75 * len(methods) * len(datasets), 3.4),
                                squeeze=False)
    colours = _method_colours(methods)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        frame = metrics[(metrics["dataset"] == dataset) & metrics["method"].isin(methods)]
        if frame.empty:
            _nothing_to_show(axis, "no finished runs")
        else:
            order = list(methods)  # a method with no finished seed keeps its (empty) place
            sns.boxplot(data=frame, x="method", y=metric, order=order, hue="method", palette=colours,
                        showfliers=False, width=0.5, boxprops={"alpha": 0.35}, ax=axis, legend=False)
            sns.stripplot(data=frame, x="method", y=metric, order=order, hue="method", palette=colours,
                          size=5, jitter=0.12, edgecolor="black", linewidth=0.5, ax=axis, legend=False)
            reported = [(i, paper.get(dataset, {}).get(method, {}).get(metric)) for i, method in enumerate(order)]
            reported = [(i, value) for i, value in reported if value is not None]
            if reported:
                axis.plot(*zip(*reported, strict=True), **PAPER_MARKER, label="paper")
                axis.legend(fontsize=7, loc="lower right")
            axis.tick_params(axis="x", rotation=45, labelsize=7)
            for label in axis.get_xticklabels():
                label.set_horizontalalignment("right")
        axis.set_title(dataset, fontsize=9)
        axis.set_xlabel("")
        axis.set_ylabel(f"test {metric} (one dot per seed)")
    figure.tight_layout()
    return save_figure(figure, stem)


def ablation_steps(metrics: pd.DataFrame, paper: dict, datasets: list[str], variants: list[str], labels: dict,
                   stem: Path, metric: str = "mIoU") -> list[Path]:
    """One panel per dataset: ``metric`` (mean ± std over seeds) of the ablation ``variants`` in order,
    drawn as a step line; the paper's Table 2 values as a dashed step line where it reports them.
    labels: ``{variant: tick label}``."""
    figure, axes = plt.subplots(1, len(datasets), figsize=(1.5 + 1.0 * max(len(variants), 2) * len(datasets), 3.4),
                                squeeze=False)
    positions = np.arange(len(variants))
    for axis, dataset in zip(axes[0], datasets, strict=True):
        frame = metrics[(metrics["dataset"] == dataset) & metrics["method"].isin(variants)]
        if frame.empty:
            _nothing_to_show(axis, "no finished ablation runs" if variants else "no ablation variants configured")
        else:
            grouped = frame.groupby("method")[metric]
            mean = grouped.mean().reindex(variants).to_numpy()
            std = grouped.std(ddof=1).fillna(0.0).reindex(variants).to_numpy()
            axis.step(positions, mean, where="mid", color=PALETTE[0], label="reproduced (mean ± std)")
            axis.errorbar(positions, mean, yerr=std, fmt="o", color=PALETTE[0], capsize=3)
            reported = np.array([paper.get(dataset, {}).get(v, {}).get(metric, np.nan) for v in variants], float)
            if np.isfinite(reported).any():
                axis.step(positions, reported, where="mid", color=PALETTE[1], linestyle="--", label="paper")
                axis.plot(positions, reported, "s", color=PALETTE[1])
            axis.legend(fontsize=7, loc="lower right")
            axis.set_xticks(positions, [labels.get(v, v) for v in variants], rotation=30, ha="right", fontsize=7)
        axis.set_title(dataset, fontsize=9)
        axis.set_ylabel(f"test {metric}")
    figure.tight_layout()
    return save_figure(figure, stem)


def load_histories(run_dir: Path, datasets: list[str], methods: list[str], seeds: list[int]) -> pd.DataFrame:
    """Every finished ``history.csv`` with dataset, method and seed columns added."""
    frames = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                path = run_path(run_dir, dataset, method, seed) / "history.csv"
                if path.exists():
                    frames.append(pd.read_csv(path).assign(dataset=dataset, method=method, seed=seed))
    if not frames:
        return pd.DataFrame(columns=["epoch", "loss", "val_mIoU", "dataset", "method", "seed"])
    return pd.concat(frames, ignore_index=True)


def training_curves(histories: pd.DataFrame, datasets: list[str], methods: list[str], stem: Path) -> list[Path]:
    """Rows: datasets; columns: training loss and validation mIoU per epoch; a line per method (mean
    over seeds) with a band of ± one std over seeds."""
    figure, axes = plt.subplots(len(datasets), 2, figsize=(8.5, 2.8 * len(datasets)), squeeze=False)
    colours = _method_colours(methods)
    for row, dataset in enumerate(datasets):
        frame = histories[histories["dataset"] == dataset]
        for axis, column, label in ((axes[row, 0], "loss", "training loss"), (axes[row, 1], "val_mIoU", "val mIoU")):
            if frame.empty:
                _nothing_to_show(axis, "no finished runs")
            for method in methods:
                curve = frame[frame["method"] == method].groupby("epoch")[column].agg(["mean", "std"]).fillna(0.0)
                if curve.empty:
                    continue
                axis.plot(curve.index, curve["mean"], color=colours[method], label=method, marker=".")
                axis.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"],
                                  color=colours[method], alpha=0.2, linewidth=0)
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_title(f"{dataset}: {label}", fontsize=9)
            axis.set_xlabel("epoch")
            axis.set_ylabel(label)
    handles, names = axes[0, 1].get_legend_handles_labels()
    if handles:
        figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    figure.tight_layout()
    return save_figure(figure, stem)


#: The benchmark files of a run's training jobs (workflow/rules/train.smk); evaluate.tsv is the test's.
TRAINING_BENCHMARKS = ("train_stage1.tsv", "pseudo_masks.tsv", "train.tsv")


def load_benchmarks(run_dir: Path, datasets: list[str], methods: list[str], seeds: list[int]) -> pd.DataFrame:
    """Training cost per finished run: dataset, method, seed, hours (benchmark ``s`` / 3600, summed over
    the run's training jobs, :data:`TRAINING_BENCHMARKS`: a two-stage method's first stage and pseudo
    masks too, not the evaluation), max_rss (MB), device (from run.json's environment; "unknown" without it)."""
    rows = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                folder = benchmark_path(run_dir, dataset, method, seed)
                if not (folder / "train.tsv").exists():
                    continue
                bench = pd.concat([pd.read_csv(folder / name, sep="\t") for name in TRAINING_BENCHMARKS
                                   if (folder / name).exists()])
                run_json = run_path(run_dir, dataset, method, seed) / "run.json"
                device = "unknown"
                if run_json.exists():
                    device = pd.read_json(run_json, typ="series")["environment"].get("device", "unknown")
                rows.append({"dataset": dataset, "method": method, "seed": seed,
                             "hours": float(bench["s"].sum()) / 3600, "max_rss": float(bench["max_rss"].max()),
                             "device": "GPU" if str(device).startswith("cuda") else str(device).upper()})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "hours", "max_rss", "device"])


def compute_cost(benchmarks: pd.DataFrame, datasets: list[str], methods: list[str], stem: Path) -> list[Path]:
    """One panel per dataset: training time per method (bar: mean over seeds; dots: seeds), from the
    Snakemake benchmark files, in hours (minutes when every run took under an hour); the y label names
    the device kind the runs used (CPU or GPU)."""
    figure, axes = plt.subplots(1, len(datasets), figsize=(1.2 + 0.7 * len(methods) * len(datasets), 3.4),
                                squeeze=False)
    colours = _method_colours(methods)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        frame = benchmarks[benchmarks["dataset"] == dataset]
        if frame.empty:
            _nothing_to_show(axis, "no benchmark files")
        else:
            order = list(methods)  # a method with no benchmark file keeps its (empty) place
            unit = "hours" if frame["hours"].max() >= 1 else "minutes"  # demo runs take minutes
            frame = frame.assign(**{unit: frame["hours"] * (1 if unit == "hours" else 60)})
            sns.barplot(data=frame, x="method", y=unit, order=order, hue="method", palette=colours,
                        errorbar=None, alpha=0.6, ax=axis, legend=False)
            sns.stripplot(data=frame, x="method", y=unit, order=order, color="black", size=4, jitter=0.1, ax=axis)
            axis.tick_params(axis="x", rotation=45, labelsize=7)
            for label in axis.get_xticklabels():
                label.set_horizontalalignment("right")
            devices = "/".join(sorted(set(frame["device"])))
            axis.set_ylabel(f"{devices} {unit} per training run")
        axis.set_title(dataset, fontsize=9)
        axis.set_xlabel("")
    figure.tight_layout()
    return save_figure(figure, stem)


def write_figures(run_dir: Path, datasets: list[str], methods: list[str], seeds: list[int], data_roots: dict,
                  paper: dict, out_dir: Path, n_images: int = 4) -> list[Path]:
    """Every figure of the module docstring for what finished under ``run_dir``; returns the paths.

    data_roots: ``{dataset: folder}`` for the qualitative grid; paper: the parsed
    ``config/paper_results.yaml``."""
    out_dir = Path(out_dir)
    runs = finished_runs(run_dir, Grid(datasets, methods, seeds))
    runs = runs[runs["method"] != TRIVIAL]
    metrics = load_metrics([Path(path) / "test_metrics.json" for path in runs["path"]])
    variants = [method for method in ABLATION if method in methods]
    labels = {method: values["label"].split(":")[0] + f": {method}"
              for method, values in paper["table2"].get("luad-histoseg", {}).items()}
    written = []
    for dataset in datasets:
        written += qualitative_grid(dataset, data_roots[dataset], run_dir, methods, seeds,
                                    out_dir / f"qualitative_{dataset}", n_images)
    written += seed_spread(metrics, paper["table1"], datasets, methods, out_dir / "miou_over_seeds")
    written += ablation_steps(metrics, paper["table2"], datasets, variants, labels, out_dir / "ablation")
    written += training_curves(load_histories(run_dir, datasets, methods, seeds), datasets, methods,
                               out_dir / "training_curves")
    written += compute_cost(load_benchmarks(run_dir, datasets, methods, seeds), datasets, methods,
                            out_dir / "compute_cost")
    return written
