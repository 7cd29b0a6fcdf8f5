"""The figures of an experiment, each written as PNG and PDF (matplotlib/seaborn, colour-blind-safe palette).

(a) :func:`qualitative_grid`     image, ground truth and each method's predicted mask overlaid on the H&E
                                 image (like the paper's Fig. 3)
(b) :func:`class_heatmaps`       the heat maps the registry names per method (the CAM family's class
                                 activation maps or Grad-CAM, PathMamba's Y' and Y'') on the same test
                                 images, from one seed's ``model.pt`` (CPU)
(c) :func:`seed_spread`          mIoU of every seed per method and dataset, box + dots, the paper's value
                                 and the trivial reference marked
(d) :func:`ablation_steps`       PathMamba's ablation (Table 2) as a step chart
(e) :func:`per_class_chart`      per-class IoU per method, mean ± std over seeds, the trivial reference marked
(f) :func:`confusion_matrices`   row-normalised confusion matrix per method (images and seeds summed)
(g) :func:`training_curves`      training loss and validation mIoU on a normalised epoch axis (epoch /
                                 epochs of the run), mean over seeds with a ±std band
(h) :func:`compute_cost`         training hours per method from the Snakemake ``benchmark:`` files

Every method keeps one colour and one marker (:func:`method_styles`) in every figure, so that methods
stay apart in grey-scale print and where the palette's colours repeat.

Every function draws whatever finished and writes its files even when nothing did (an axis that says
so), so that the figures of a partial grid exist too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pathmamba.core.layout import (
    BENCHMARK_FILES,
    DATASET_FIGURES,
    FIGURE_FORMATS,
    HISTORY,
    MASKS,
    MODEL,
    RUN_FIGURES,
    RUN_RECORD,
    TEST_METRICS,
    TRIVIAL,
    benchmark_path,
    run_path,
)
from pathmamba.data.readers import index_dataset, read_image, read_mask
from pathmamba.engine.evaluate import overlay_mask
from pathmamba.engine.metrics import confusion_classes, confusion_columns
from pathmamba.engine.registry import ablation_methods
from pathmamba.reporting.results import (
    Grid,
    finished_runs,
    load_metrics,
    load_per_class_iou,
    load_per_image,
    recorded_dataset_spec,
)

#: seaborn's colour-blind-safe palette without its grey, which the reference lines and steps use.
PALETTE = [colour for i, colour in enumerate(sns.color_palette("colorblind")) if i != 7]
#: One marker per method in the order of the configured methods (then repeated); "x" is the paper's. The
#: palette has 9 colours, so methods i and i + 9 share one: their markers (o/*, s/X, ^/h, D/8) differ in shape.
MARKERS = ("o", "s", "^", "D", "v", "P", "p", "<", ">", "*", "X", "h", "8")
DPI = 150
GRID_CELL_INCHES = 1.4
GRID_LEGEND_INCHES = 0.6
GRID_LABEL_INCHES = 0.25
PAPER_MARKER = {"marker": "x", "color": "black", "markersize": 7, "markeredgewidth": 1.8, "linestyle": "none"}
#: The trivial reference (docs/design.md §4.6): a grey dashed line wherever it is drawn.
TRIVIAL_LINE = {"color": "0.35", "linestyle": "--", "linewidth": 1.2}
#: Opacity of the mask colours over the H&E image in the qualitative grid.
MASK_ALPHA = 0.5
#: The ground truth's unscored background over a predicted mask: a light grey wash with darker diagonal
#: hatching every ``UNSCORED_HATCH`` pixels, so that it reads as neither a class colour nor glass.
UNSCORED_GREY, UNSCORED_HATCH = 200, 4
HEATMAP_CMAP = "viridis"
HEATMAP_ALPHA = 0.6


def save_figure(figure, stem: Path, tight: bool = True) -> list[Path]:
    """Write ``figure`` to ``stem``.png and ``stem``.pdf and close it; returns the two paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{extension}") for extension in FIGURE_FORMATS]
    for path in paths:
        tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
        figure.savefig(tmp, dpi=DPI, bbox_inches="tight" if tight else None)
        tmp.replace(path)
    plt.close(figure)
    return paths


def method_styles(methods: list[str]) -> dict[str, dict]:
    """``{method: {"color": ..., "marker": ...}}``, by position in ``methods``: the same in every figure."""
    return {method: {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}
            for i, method in enumerate(methods)}


def _method_colours(methods: list[str]) -> dict[str, tuple]:
    return {method: style["color"] for method, style in method_styles(methods).items()}


def _nothing_to_show(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, fontsize=9, color="0.4")
    axis.set_xticks([])
    axis.set_yticks([])


def _rotate_ticks(axis) -> None:
    axis.tick_params(axis="x", rotation=45, labelsize=7)
    for label in axis.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")


def grid_pixel_size(n_images: int, n_methods: int) -> tuple[int, int]:
    """(width, height) in pixels of the qualitative grid PNG for ``n_images`` rows and ``n_methods``."""
    width = (2 + n_methods) * GRID_CELL_INCHES + GRID_LABEL_INCHES
    height = max(n_images, 1) * GRID_CELL_INCHES + GRID_LEGEND_INCHES
    return round(width * DPI), round(height * DPI)


def image_label(stem: str, width: int = 26) -> str:
    """A test image's name for a row label: on two lines when longer than ``width`` characters (BCSS
    names share their first 18 characters), its middle elided when longer than two lines."""
    if len(stem) <= width:
        return stem
    if len(stem) > 2 * width:
        stem = stem[:width - 1] + "\u2026" + stem[-width:]
    half = math.ceil(len(stem) / 2)
    return f"{stem[:half]}\n{stem[half:]}"


def _test_images(dataset: str, data_root: Path, n_images: int, experiment_dir: Path):
    spec = recorded_dataset_spec(experiment_dir, dataset)
    return spec, sorted(index_dataset(Path(data_root), spec).test, key=lambda pair: pair[0].name)[:n_images]


def _class_legend(figure, spec, background: str = "background (not scored)") -> None:
    handles = [Patch(facecolor=np.array(rgb) / 255, edgecolor="0.3", label=name)
               for name, rgb in zip([*spec.classes, background], spec.palette, strict=True)]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=6, frameon=False)


def mark_unscored(overlay: np.ndarray, truth: np.ndarray, background: int) -> np.ndarray:
    """(H, W, 3) uint8 ``overlay`` of a predicted mask with the pixels that are not scored (ground truth
    ``background``, the index after the tissue classes) greyed and hatched; the prediction itself, saved
    raw, is left as it is."""
    h, w = truth.shape
    unscored = truth >= background
    hatch = (np.add.outer(np.arange(h), np.arange(w)) % UNSCORED_HATCH) == 0
    grey = np.where(hatch, UNSCORED_GREY // 2, UNSCORED_GREY)[..., None]
    washed = np.rint(0.3 * overlay.astype(np.float32) + 0.7 * grey).astype(np.uint8)
    return np.where(unscored[..., None], washed, overlay)


def qualitative_grid(dataset: str, data_root: Path, experiment_dir: Path, methods: list[str], seeds: list[int],
                     stem: Path, n_images: int = 4) -> list[Path]:
    """Rows: the first ``n_images`` test images by file name (those whose masks evaluation saves).
    Columns: image, ground truth, then each method's predicted mask from its first finished seed
    (the seed named in the column title), each mask overlaid on the image in the dataset's palette
    (opacity :data:`MASK_ALPHA`), with a legend. The ground truth's background is left uncoloured; over
    a prediction (saved raw, every pixel a class) the pixels it covers, not scored, are greyed and
    hatched (:func:`mark_unscored`). The PNG has exactly :func:`grid_pixel_size` pixels."""
    spec, test = _test_images(dataset, data_root, n_images, experiment_dir)
    columns = []
    for method in methods:
        found = [seed for seed in seeds if (run_path(experiment_dir, dataset, method, seed) / MASKS).is_dir()]
        columns.append((method, found[0] if found else None))
    width, height = grid_pixel_size(len(test), len(methods))
    figure = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    legend_fraction = GRID_LEGEND_INCHES / (height / DPI)
    axes = figure.subplots(max(len(test), 1), 2 + len(methods), squeeze=False,
                           gridspec_kw={"left": GRID_LABEL_INCHES / (width / DPI), "right": 0.99,
                                        "top": 0.97 - 0.1 * legend_fraction, "bottom": legend_fraction,
                                        "wspace": 0.04, "hspace": 0.04})
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
        image, truth = read_image(image_path), read_mask(mask_path, spec)
        axes[row, 0].imshow(image)
        axes[row, 1].imshow(overlay_mask(image, truth, spec.palette, MASK_ALPHA))
        axes[row, 0].set_ylabel(image_label(image_path.stem), fontsize=5)
        for col, (method, seed) in enumerate(columns, start=2):
            predicted = None if seed is None else run_path(experiment_dir, dataset, method, seed) / MASKS / image_path.name
            if predicted is not None and predicted.exists():
                overlay = overlay_mask(image, read_mask(predicted, spec), spec.palette, MASK_ALPHA)
                axes[row, col].imshow(mark_unscored(overlay, truth, spec.background))
            else:
                _nothing_to_show(axes[row, col], "not run" if seed is None else "mask not saved")
    _class_legend(figure, spec, "background (not scored: uncoloured in the ground truth, hatched grey "
                                "over predictions)")
    return save_figure(figure, stem, tight=False)


def _heatmap_columns(dataset: str, experiment_dir: Path, methods: list[str], seeds: list[int]) -> list[dict]:
    """The heat-map columns: per method its registry entry's ``heatmaps`` (none: no column), each from the
    lowest seed whose ``model.pt`` exists, loaded on the CPU. A column: method, seed, model, heatmap (the
    :class:`pathmamba.engine.registry.HeatMap`), maps (its function), title."""
    from pathmamba.engine.evaluate import load_model
    from pathmamba.engine.registry import METHODS, load_target

    columns = []
    for method in methods:
        heatmaps = METHODS[method].heatmaps if method in METHODS else ()
        found = [seed for seed in sorted(seeds) if (run_path(experiment_dir, dataset, method, seed) / MODEL).exists()]
        if not heatmaps or not found:
            continue
        _, model = load_model(run_path(experiment_dir, dataset, method, found[0]) / MODEL)
        model.eval()
        columns += [{"method": method, "seed": found[0], "model": model, "heatmap": heatmap,
                     "maps": load_target(heatmap.maps), "title": f"{method} (seed {found[0]})\n{heatmap.title}"}
                    for heatmap in heatmaps]
    return columns


def class_heatmap(column: dict, image: np.ndarray) -> np.ndarray:
    """(C, H, W) float32 maps in [0, 1] of one heat-map column (:func:`_heatmap_columns`) for one
    (H, W, 3) uint8 image: the column's function of its model, e.g. a CAM-family model's class activation
    maps scaled as its ``predict`` does, its Grad-CAM, PathMamba's Y' or sigmoid(Y'')."""
    from pathmamba.data.datasets import to_tensor

    return column["maps"](column["model"], to_tensor(image)[None])[0].float().numpy()


def class_heatmaps(dataset: str, data_root: Path, experiment_dir: Path, methods: list[str], seeds: list[int],
                   stem: Path, n_images: int = 4) -> list[Path]:
    """Rows: the qualitative grid's test images; columns: the image with its ground truth overlaid, then
    the heat maps of each method that has them (:func:`_heatmap_columns`), each over
    the grey-scale image. Each row shows the map of the image's most frequent ground-truth class (named
    at the left), the same class in every column, on a common 0..1 colour scale."""
    spec, test = _test_images(dataset, data_root, n_images, experiment_dir)
    columns = _heatmap_columns(dataset, experiment_dir, methods, seeds)
    n_rows, n_cols = max(len(test), 1), 1 + max(len(columns), 1)
    figure = plt.figure(figsize=(0.35 + GRID_CELL_INCHES * n_cols, 0.85 + GRID_CELL_INCHES * n_rows), dpi=DPI)
    axes = figure.subplots(n_rows, n_cols, squeeze=False, gridspec_kw={"wspace": 0.04, "hspace": 0.06})
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0, 0].set_title("image + ground truth", fontsize=6)
    for axis, column in zip(axes[0, 1:], columns, strict=False):
        axis.set_title(column["title"], fontsize=6)
    if not test:
        _nothing_to_show(axes[0, 0], f"no test images in {data_root}")
    if not columns:
        _nothing_to_show(axes[0, 1], "no model.pt of a\nmethod with heat maps")
    heat = None
    for row, (image_path, mask_path) in enumerate(test):
        image, truth = read_image(image_path), read_mask(mask_path, spec)
        counts = np.bincount(truth[truth < spec.num_classes].ravel(), minlength=spec.num_classes)
        shown = int(counts.argmax())
        axes[row, 0].imshow(overlay_mask(image, truth, spec.palette, MASK_ALPHA))
        axes[row, 0].set_ylabel(f"{image_label(image_path.stem)}\nclass: {spec.classes[shown]}", fontsize=5)
        grey = image.astype(np.float32).mean(axis=2)
        for col, column in enumerate(columns, start=1):
            axes[row, col].imshow(grey, cmap="gray", vmin=0, vmax=255)
            heat = axes[row, col].imshow(class_heatmap(column, image)[shown], cmap=HEATMAP_CMAP, vmin=0, vmax=1,
                                         alpha=HEATMAP_ALPHA)
    if heat is not None:
        bar = figure.colorbar(heat, ax=axes.ravel().tolist(), orientation="horizontal", fraction=0.9 / (n_rows * 8),
                              pad=0.02, aspect=40, shrink=0.6)
        scalings = dict.fromkeys(column["heatmap"].scaling for column in columns)
        bar.set_label(f"map of the row's class ({'; '.join(scalings)})", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    return save_figure(figure, stem)


def _trivial_value(trivial: pd.DataFrame | None, dataset: str, metric: str) -> float | None:
    if trivial is None or trivial.empty:
        return None
    values = trivial.loc[trivial["dataset"] == dataset, metric].dropna()
    return float(values.iloc[0]) if len(values) else None


def _reference_handles(paper: bool, trivial: bool, reproduced: bool = False) -> list:
    handles = []
    if reproduced:
        handles.append(Line2D([], [], color="0.5", marker="o", label="reproduced (mean ± std over seeds)"))
    if paper:
        handles.append(Line2D([], [], label="paper", **PAPER_MARKER))
    if trivial:
        handles.append(Line2D([], [], label="trivial reference", **TRIVIAL_LINE))
    return handles


def seed_spread(metrics: pd.DataFrame, paper: dict, datasets: list[str], methods: list[str], stem: Path,
                metric: str = "mIoU", trivial: pd.DataFrame | None = None, styles: dict | None = None) -> list[Path]:
    """One panel per dataset: ``metric`` of each seed (dots in the method's colour and marker) and their
    box per method; the paper's value as a black cross, the trivial reference (rows of ``trivial``, as
    ``metrics``) as a grey dashed line. metrics: rows of :func:`pathmamba.reporting.results.load_metrics`;
    paper: ``{dataset: {method: {metric: value}}}``."""
    styles = styles or method_styles(methods)
    figure, axes = plt.subplots(1, len(datasets), figsize=(1.2 + 0.5 * len(methods) * len(datasets), 3.4),
                                squeeze=False)
    any_paper = any_trivial = False
    rng = np.random.default_rng(0)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        frame = metrics[(metrics["dataset"] == dataset) & metrics["method"].isin(methods)]
        if frame.empty:
            _nothing_to_show(axis, "no finished runs")
        else:
            for i, method in enumerate(methods):  # a method with no finished seed keeps its (empty) place
                values = frame.loc[frame["method"] == method, metric].dropna().to_numpy(float)
                if not len(values):
                    continue
                style = styles[method]
                axis.boxplot([values], positions=[i], widths=0.55, showfliers=False, patch_artist=True,
                             boxprops={"facecolor": (*style["color"], 0.3), "edgecolor": style["color"]},
                             medianprops={"color": style["color"]}, whiskerprops={"color": style["color"]},
                             capprops={"color": style["color"]})
                axis.scatter(i + rng.uniform(-0.13, 0.13, len(values)), values, s=26, zorder=3,
                             edgecolors="black", linewidths=0.5, **style)
            reported = [(i, paper.get(dataset, {}).get(method, {}).get(metric)) for i, method in enumerate(methods)]
            reported = [(i, value) for i, value in reported if value is not None]
            if reported:
                any_paper = True
                axis.plot(*zip(*reported, strict=True), zorder=4, **PAPER_MARKER)
            axis.set_xticks(range(len(methods)), methods)
            axis.set_xlim(-0.6, len(methods) - 0.4)
            _rotate_ticks(axis)
        reference = _trivial_value(trivial, dataset, metric)
        if reference is not None and not frame.empty:
            any_trivial = True
            axis.axhline(reference, zorder=1, **TRIVIAL_LINE)
        axis.set_title(dataset, fontsize=9)
        axis.set_ylabel(f"test {metric} (one dot per seed)")
    figure.tight_layout()
    handles = _reference_handles(any_paper, any_trivial)
    if handles:
        figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                      fontsize=7, frameon=False)
    return save_figure(figure, stem)


def ablation_steps(metrics: pd.DataFrame, paper: dict, datasets: list[str], variants: list[str], labels: dict,
                   stem: Path, metric: str = "mIoU", trivial: pd.DataFrame | None = None,
                   styles: dict | None = None) -> list[Path]:
    """One panel per dataset: ``metric`` (mean ± std over seeds) of the ablation ``variants`` in order,
    drawn as a grey step line with each variant's colour and marker; the paper's Table 2 values as
    black crosses on a dotted step line where it reports them; the trivial reference as a grey dashed
    line. labels: ``{variant: tick label}``."""
    styles = styles or method_styles(variants)
    figure, axes = plt.subplots(1, len(datasets), figsize=(1.5 + 1.0 * max(len(variants), 2) * len(datasets), 3.4),
                                squeeze=False)
    positions = np.arange(len(variants))
    any_paper = any_trivial = any_reproduced = False
    for axis, dataset in zip(axes[0], datasets, strict=True):
        frame = metrics[(metrics["dataset"] == dataset) & metrics["method"].isin(variants)]
        if frame.empty:
            _nothing_to_show(axis, "no finished ablation runs" if variants else "no ablation variants configured")
        else:
            any_reproduced = True
            grouped = frame.groupby("method")[metric]
            mean = grouped.mean().reindex(variants).to_numpy()
            std = grouped.std(ddof=1).fillna(0.0).reindex(variants).to_numpy()
            axis.step(positions, mean, where="mid", color="0.5", zorder=1)
            for position, variant, value, spread in zip(positions, variants, mean, std, strict=True):
                if np.isfinite(value):
                    axis.errorbar([position], [value], yerr=[spread], capsize=3, markersize=7,
                                  markeredgecolor="black", markeredgewidth=0.5, zorder=3,
                                  color=styles[variant]["color"], marker=styles[variant]["marker"])
            reported = np.array([paper.get(dataset, {}).get(v, {}).get(metric, np.nan) for v in variants], float)
            if np.isfinite(reported).any():
                any_paper = True
                axis.step(positions, reported, where="mid", color="black", linestyle=":", linewidth=1, zorder=2)
                axis.plot(positions, reported, zorder=4, **PAPER_MARKER)
            reference = _trivial_value(trivial, dataset, metric)
            if reference is not None:
                any_trivial = True
                axis.axhline(reference, zorder=1, **TRIVIAL_LINE)
            axis.set_xticks(positions, [labels.get(v, v) for v in variants], rotation=30, ha="right", fontsize=7,
                            rotation_mode="anchor")
        axis.set_title(dataset, fontsize=9)
        axis.set_ylabel(f"test {metric}")
    figure.tight_layout()
    handles = _reference_handles(any_paper, any_trivial, reproduced=any_reproduced)
    if handles:
        figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                      fontsize=7, frameon=False)
    return save_figure(figure, stem)


def per_class_chart(per_class: pd.DataFrame, datasets: list[str], methods: list[str], stem: Path,
                    styles: dict | None = None) -> list[Path]:
    """Rows: datasets; per tissue class (x, the dataset's names) a dot per method, mean ± std over its
    seeds, in the method's colour and marker; the trivial reference as a grey dashed segment across the
    class. per_class: rows of :func:`pathmamba.reporting.results.load_per_class_iou` (the trivial's seed None)."""
    styles = styles or method_styles(methods)
    classes_of = {dataset: list(pd.unique(per_class.loc[per_class["dataset"] == dataset, "class"]))
                  for dataset in datasets}  # in each dataset's own order (the records')
    width = max(6.0, 1.2 + 0.11 * len(methods) * max((len(classes) for classes in classes_of.values()), default=1))
    figure, axes = plt.subplots(len(datasets), 1, figsize=(width, 2.6 * len(datasets)), squeeze=False)
    spacing = 0.8 / max(len(methods), 1)
    for axis, dataset in zip(axes[:, 0], datasets, strict=True):
        classes = classes_of[dataset]
        frame = per_class[per_class["dataset"] == dataset]
        if frame.empty:
            _nothing_to_show(axis, "no finished runs")
        for j, method in enumerate(methods):
            rows = frame[frame["method"] == method]
            if rows.empty:
                continue
            grouped = rows.groupby("class")["IoU"]
            mean = grouped.mean().reindex(classes).to_numpy()
            std = grouped.std(ddof=1).fillna(0.0).reindex(classes).to_numpy()
            axis.errorbar(np.arange(len(classes)) + (j - (len(methods) - 1) / 2) * spacing, mean, yerr=std,
                          linestyle="none", capsize=1.5, markersize=5, markeredgecolor="black",
                          markeredgewidth=0.4, elinewidth=0.8, label=method, **styles[method])
        trivial = frame[frame["method"] == TRIVIAL].set_index("class")["IoU"].reindex(classes)
        for k, value in enumerate(trivial.to_numpy()):
            if np.isfinite(value):
                axis.plot([k - 0.45, k + 0.45], [value, value], zorder=1, label="trivial reference", **TRIVIAL_LINE)
        for k in range(1, len(classes)):
            axis.axvline(k - 0.5, color="0.85", linewidth=0.8, zorder=0)
        axis.set_xticks(range(len(classes)), classes, fontsize=8)
        axis.set_xlim(-0.5, len(classes) - 0.5)
        axis.set_ylim(-0.03, 1.03)
        axis.set_title(dataset, fontsize=9)
        axis.set_ylabel("test IoU (mean ± std over seeds)", fontsize=8)
    handles, names = [], []
    for axis in axes[:, 0]:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    if "trivial reference" in names:  # last, after the methods
        i = names.index("trivial reference")
        handles.append(handles.pop(i))
        names.append(names.pop(i))
    figure.tight_layout()
    if handles:
        figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    return save_figure(figure, stem)


def normalised_confusion(per_image: pd.DataFrame, dataset: str, method: str) -> np.ndarray:
    """(K, K) confusion matrix of ``method`` on ``dataset`` (rows: truth, columns: prediction), summed over
    the test images and seeds of ``per_image`` (:func:`pathmamba.reporting.results.load_per_image`) and divided by
    each row's sum, so a row holds where that class's pixels went; nan for a class with no pixel."""
    rows = per_image[(per_image["dataset"] == dataset) & (per_image["method"] == method)]
    classes = confusion_classes(rows)
    counts = rows[confusion_columns(classes)].to_numpy(float).sum(axis=0).reshape(classes, classes)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)


def confusion_matrices(per_image: pd.DataFrame, dataset: str, classes: list[str], methods: list[str], stem: Path,
                       columns: int = 5) -> list[Path]:
    """Small multiples, one panel per method of ``methods`` that finished (and the trivial reference when
    it did): :func:`normalised_confusion` with the dataset's class names ``classes``, each cell's share
    written in it."""
    n_classes = len(classes)
    frame = per_image[per_image["dataset"] == dataset]
    shown = [m for m in [*methods, TRIVIAL] if (frame["method"] == m).any()]
    n_cols = min(columns, max(len(shown), 1))
    n_rows = max(math.ceil(len(shown) / n_cols), 1)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(0.6 + 2.0 * n_cols, 0.5 + 2.0 * n_rows), squeeze=False)
    image = None
    for i, axis in enumerate(axes.flat):
        if i >= len(shown):
            axis.axis("off")
            continue
        method = shown[i]
        matrix = normalised_confusion(frame, dataset, method)
        image = axis.imshow(np.ma.masked_invalid(matrix), cmap="Blues", vmin=0, vmax=1)
        for t in range(n_classes):
            for p in range(n_classes):
                value = matrix[t, p]
                axis.text(p, t, "—" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=6,
                          color="white" if np.isfinite(value) and value > 0.6 else "black")
        seeds = frame.loc[frame["method"] == method, "seed"].dropna().nunique()
        axis.set_title(method if method == TRIVIAL else f"{method} ({seeds} seed{'s' * (seeds != 1)})", fontsize=7)
        axis.set_xticks(range(n_classes), classes if i + n_cols >= len(shown) else [""] * n_classes,
                        fontsize=6, rotation=45, ha="right", rotation_mode="anchor")
        axis.set_yticks(range(n_classes), classes if i % n_cols == 0 else [""] * n_classes, fontsize=6)
        if i + n_cols >= len(shown):
            axis.set_xlabel("predicted", fontsize=7)
        if i % n_cols == 0:
            axis.set_ylabel("true", fontsize=7)
    if not shown:
        _nothing_to_show(axes[0, 0], "no finished runs")
    figure.suptitle(f"{dataset}: confusion matrices, rows normalised (images and seeds summed)", fontsize=9)
    figure.tight_layout()
    if image is not None:
        bar = figure.colorbar(image, ax=axes.ravel().tolist(), fraction=0.02, pad=0.02)
        bar.set_label("share of the true class's pixels", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return save_figure(figure, stem)


def load_histories(experiment_dir: Path, datasets: list[str], methods: list[str], seeds: list[int]) -> pd.DataFrame:
    """Every finished ``history.csv`` with dataset, method and seed columns added, and ``epochs``: the
    epochs the run was configured for (``run.json``'s settings; without it, its last epoch)."""
    frames = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                folder = run_path(experiment_dir, dataset, method, seed)
                if not (folder / HISTORY).exists():
                    continue
                history = pd.read_csv(folder / HISTORY)
                epochs = None
                if (folder / RUN_RECORD).exists():
                    epochs = json.loads((folder / RUN_RECORD).read_text()).get("settings", {}).get("epochs")
                epochs = int(epochs or history["epoch"].max())
                frames.append(history.assign(dataset=dataset, method=method, seed=seed, epochs=epochs))
    if not frames:
        return pd.DataFrame(columns=["epoch", "loss", "val_mIoU", "dataset", "method", "seed", "epochs"])
    return pd.concat(frames, ignore_index=True)


def with_progress(histories: pd.DataFrame) -> pd.DataFrame:
    """``histories`` with ``progress`` = epoch / epochs of the run, so runs of 5 and 60 epochs share one
    0..1 axis; ``epochs`` from :func:`load_histories`, else each run's last epoch."""
    histories = histories.copy()
    if "epochs" not in histories or histories["epochs"].isna().any():
        last = histories.groupby(["dataset", "method", "seed"])["epoch"].transform("max")
        histories["epochs"] = histories["epochs"].fillna(last) if "epochs" in histories else last
    histories["progress"] = histories["epoch"].astype(float) / histories["epochs"].astype(float)
    return histories


def training_curves(histories: pd.DataFrame, datasets: list[str], methods: list[str], stem: Path,
                    styles: dict | None = None) -> list[Path]:
    """Rows: datasets; columns: training loss and validation mIoU against training progress (epoch /
    epochs of the run, :func:`with_progress`); a line per method (mean over seeds) in its colour and
    marker with a band of ± one std over seeds; the legend names each method's epochs."""
    styles = styles or method_styles(methods)
    histories = with_progress(histories)
    figure, axes = plt.subplots(len(datasets), 2, figsize=(8.5, 2.8 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        frame = histories[histories["dataset"] == dataset]
        for axis, column, label in ((axes[row, 0], "loss", "training loss"), (axes[row, 1], "val_mIoU", "val mIoU")):
            if frame.empty:
                _nothing_to_show(axis, "no finished runs")
            for method in methods:
                runs = frame[frame["method"] == method]
                curve = runs.groupby("progress")[column].agg(["mean", "std"]).fillna(0.0)
                if curve.empty:
                    continue
                epochs = sorted({int(e) for e in histories.loc[histories["method"] == method, "epochs"]})
                name = f"{method} ({'/'.join(map(str, epochs))} epoch{'s' * (epochs != [1])})"
                axis.plot(curve.index, curve["mean"], label=name, markersize=4, linewidth=1.2,
                          markevery=max(1, len(curve) // 8), **styles[method])
                axis.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"],
                                  color=styles[method]["color"], alpha=0.1, linewidth=0)
            axis.set_xlim(0, 1.02)
            axis.set_title(f"{dataset}: {label}", fontsize=9)
            axis.set_xlabel("training progress (epoch / epochs of the run)", fontsize=8)
            axis.set_ylabel(label)
    handles, names = [], []
    for axis in axes.flat:
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.tight_layout()
    if handles:
        figure.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    return save_figure(figure, stem)


#: The benchmark files of a run's training jobs (workflow/rules/train.smk); not the evaluation's.
TRAINING_BENCHMARKS = tuple(BENCHMARK_FILES[rule] for rule in ("train_stage1", "pseudo_masks", "train"))


def load_benchmarks(experiment_dir: Path, datasets: list[str], methods: list[str], seeds: list[int]) -> pd.DataFrame:
    """Training cost per finished run: dataset, method, seed, hours (benchmark ``s`` / 3600, summed over
    the run's training jobs, :data:`TRAINING_BENCHMARKS`: a two-stage method's first stage and pseudo
    masks too, not the evaluation), max_rss (MB), device (from run.json's environment; "unknown" without it)."""
    rows = []
    for dataset in datasets:
        for method in methods:
            for seed in seeds:
                folder = benchmark_path(experiment_dir, dataset, method, seed)
                if not (folder / BENCHMARK_FILES["train"]).exists():
                    continue
                bench = pd.concat([pd.read_csv(folder / name, sep="\t") for name in TRAINING_BENCHMARKS
                                   if (folder / name).exists()])
                run_json = run_path(experiment_dir, dataset, method, seed) / RUN_RECORD
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


def write_figures(experiment_dir: Path, datasets: list[str], methods: list[str], seeds: list[int], data_roots: dict,
                  paper: dict, out_dir: Path, n_images: int = 4) -> list[Path]:
    """Every figure of the module docstring for what finished under ``experiment_dir``; returns the paths.

    data_roots: ``{dataset: folder}`` for the qualitative grid and the heat maps; paper: the parsed
    ``config/paper_results.yaml``."""
    out_dir = Path(out_dir)
    every = finished_runs(experiment_dir, Grid(datasets, methods, seeds))
    runs = every[every["method"] != TRIVIAL]
    metrics = load_metrics([Path(path) / TEST_METRICS for path in runs["path"]])
    trivial = load_metrics([Path(path) / TEST_METRICS for path in every.loc[every["method"] == TRIVIAL, "path"]])
    per_class = load_per_class_iou([Path(path) / TEST_METRICS for path in every["path"]])
    per_image = load_per_image(every)
    styles = method_styles(methods)
    variants = [method for method in ablation_methods() if method in methods]
    labels = {method: values["label"].split(":")[0] + f": {method}"
              for reported in paper["table2"].values() for method, values in reported.items()}
    written = []
    for dataset in datasets:
        stems = {figure: out_dir / stem.format(dataset=dataset) for figure, stem in DATASET_FIGURES.items()}
        written += qualitative_grid(dataset, data_roots[dataset], experiment_dir, methods, seeds, stems["qualitative"],
                                    n_images)
        written += class_heatmaps(dataset, data_roots[dataset], experiment_dir, methods, seeds, stems["heatmaps"],
                                  n_images)
        classes = list(recorded_dataset_spec(experiment_dir, dataset).classes)
        written += confusion_matrices(per_image, dataset, classes, methods, stems["confusion"])
    stems = {figure: out_dir / stem for figure, stem in RUN_FIGURES.items()}
    written += seed_spread(metrics, paper["table1"], datasets, methods, stems["seed_spread"], trivial=trivial,
                           styles=styles)
    written += ablation_steps(metrics, paper["table2"], datasets, variants, labels, stems["ablation"],
                              trivial=trivial, styles=styles)
    written += per_class_chart(per_class, datasets, methods, stems["per_class"], styles=styles)
    written += training_curves(load_histories(experiment_dir, datasets, methods, seeds), datasets, methods,
                               stems["training_curves"], styles=styles)
    written += compute_cost(load_benchmarks(experiment_dir, datasets, methods, seeds), datasets, methods,
                            stems["compute_cost"])
    return written
