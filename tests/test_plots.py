"""Figures: every file written (PNG + PDF, non-empty), the qualitative grid at its exact pixel size, and
what the figures plot (captured before saving): heat maps from real model files, row-normalised
confusion matrices, the trivial reference line, the normalised epoch axis, one style per method."""

import json

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from PIL import Image
from test_tables import scores_of, write_run

from pathmamba.core.layout import run_path
from pathmamba.data.readers import index_dataset, read_image, read_mask
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.engine.evaluate import colour_mask, overlay_mask, save_palette_mask
from pathmamba.engine.metrics import confusion_columns
from pathmamba.engine.registry import build_method, get_spec, load_target, method_names
from pathmamba.reporting import plots
from pathmamba.reporting.plots import (
    PAPER_MARKER,
    TRIVIAL_LINE,
    class_heatmap,
    grid_pixel_size,
    image_label,
    load_histories,
    method_styles,
    normalised_confusion,
    with_progress,
    write_figures,
)
from pathmamba.reporting.results import Grid, finished_runs, load_paper_results, load_per_image

DATASET = "synthetic-luad"
FIGURES = ["qualitative_synthetic-luad", "heatmaps_synthetic-luad", "confusion_synthetic-luad", "miou_over_seeds",
           "ablation", "per_class_iou", "training_curves", "compute_cost"]
#: Tiny models for the heat maps: built, saved as training saves model.pt, never trained.
TINY = {"cam": {"backbone": "resnet18", "width": 8, "pretrained": "none", "output_stride": 8},
        "pathmamba": {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "d_state": 4, "ssm_ratio": 1.0,
                      "decoder_dim": 8, "backbone": "resnet18", "backbone_width": 8, "pretrained": "none"}}


@pytest.fixture()
def captured(monkeypatch):
    """{file stem: the figure} of every figure saved meanwhile, kept open to inspect what it plots."""
    figures = {}
    save = plots.save_figure

    def keep(figure, stem, tight=True):
        figures[stem.name] = figure
        return save(figure, stem, tight)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(plots.plt, "close", lambda figure=None: None)
    yield figures
    for figure in figures.values():
        matplotlib.pyplot.close(figure)


def save_tiny_model(experiment_dir, method, seed):
    torch.manual_seed(seed)
    model = build_method(method, num_classes=4, **TINY[method])
    folder = run_path(experiment_dir, DATASET, method, seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"method": method, "stage": None, "dataset": DATASET, "seed": seed, "epoch": 1,
                "hparams": TINY[method], "state_dict": model.state_dict()}, folder / "model.pt")
    return model


def fake_training(experiment_dir, method, seed, spec, test_pairs, value):
    """Masks (class 0 everywhere, as saved: raw predictions), history, run.json and benchmark of one run."""
    folder = write_run(experiment_dir, DATASET, method, seed, scores_of(value))
    (folder / "masks").mkdir()
    for image, mask in test_pairs[:2]:
        truth = read_mask(mask, spec)
        save_palette_mask(np.zeros_like(truth), spec.flat_palette, folder / "masks" / image.name)  # raw
    pd.DataFrame({"epoch": [1, 2], "loss": [0.7, 0.5 - seed / 10], "val_mIoU": [0.2, value]}).to_csv(
        folder / "history.csv", index=False)
    (folder / "run.json").write_text(json.dumps({"environment": {"device": "cpu"}}))
    bench = experiment_dir / "benchmarks" / DATASET / method / f"seed{seed}"
    bench.mkdir(parents=True)
    (bench / "train.tsv").write_text(f"s\th:m:s\tmax_rss\n{3600 * value:.2f}\t0:00:01\t800.0\n")


def test_all_figures_are_written_for_a_partial_grid(tmp_path):
    spec = get_dataset_spec(DATASET)
    data_root = tmp_path / "data"
    make_synthetic_dataset(DATASET, data_root, n_train=4, n_val=2, n_test=3, size=32, seed=0)
    test_pairs = sorted(index_dataset(data_root, spec).test, key=lambda pair: pair[0].name)
    experiment_dir = tmp_path / "experiment"
    for seed, value in ((0, 0.5), (1, 0.6)):
        fake_training(experiment_dir, "pathmamba", seed, spec, test_pairs, value)
    fake_training(experiment_dir, "pathmamba-b", 1, spec, test_pairs, 0.4)
    write_run(experiment_dir, DATASET, "trivial", None, scores_of(0.3))
    methods = ["pathmamba-b", "cam", "pathmamba"]  # cam never ran
    save_tiny_model(experiment_dir, "pathmamba", 1)  # the heat maps' model: seed 0 has none

    written = write_figures(experiment_dir, [DATASET], methods, [0, 1], {DATASET: data_root},
                            load_paper_results(REPO / "config" / "paper_results.yaml"), tmp_path / "figures",
                            n_images=3)
    expected = {tmp_path / "figures" / f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")}
    assert set(written) == expected
    for path in expected:
        assert path.stat().st_size > 1000, path
    assert (tmp_path / "figures" / "ablation.pdf").read_bytes().startswith(b"%PDF")

    grid = Image.open(tmp_path / "figures" / "qualitative_synthetic-luad.png")
    assert grid.size == grid_pixel_size(3, len(methods))
    assert not list((tmp_path / "figures").glob(".*"))  # no temporary files left


def test_overlay_colours_tissue_and_leaves_background():
    spec = get_dataset_spec(DATASET)
    image = np.full((2, 2, 3), 100, np.uint8)
    out = overlay_mask(image, np.array([[0, 4], [4, 4]]), spec.palette, alpha=0.5)
    assert out[0, 0].tolist() == np.rint(0.5 * 100 + 0.5 * np.array(spec.palette[0])).astype(int).tolist()
    assert (out[0, 1] == 100).all() and (out[1, 1] == 100).all()


def test_unscored_background_is_greyed_and_hatched_over_a_raw_prediction():
    from pathmamba.reporting.plots import mark_unscored

    spec = get_dataset_spec(DATASET)
    image = np.full((8, 8, 3), 100, np.uint8)
    predicted = np.zeros((8, 8), int)  # a raw prediction: a class at every pixel
    truth = np.zeros((8, 8), int)
    truth[:, 4:] = 4
    overlay = overlay_mask(image, predicted, spec.palette, alpha=0.5)
    marked = mark_unscored(overlay, truth, spec.background)
    assert (marked[:, :4] == overlay[:, :4]).all()  # scored pixels: the prediction as saved
    unscored = marked[:, 4:].reshape(-1, 3).astype(int)
    assert (np.ptp(unscored, axis=1) < np.ptp(overlay[0, 0].astype(int))).all()  # washed towards grey
    assert len({tuple(pixel) for pixel in unscored}) == 2  # the grey and its hatching


def test_histosegnet_heat_map_is_its_own_grad_cam():
    from baselines.cam.histosegnet import histosegnet_grad_cam
    from pathmamba.data.datasets import to_tensor

    torch.manual_seed(0)
    model = build_method("histosegnet", 4, backbone="resnet18", width=8).eval()
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    heatmap = get_spec("histosegnet").heatmaps[0]
    heat = class_heatmap({"maps": load_target(heatmap.maps), "model": model}, image)
    np.testing.assert_array_equal(heat, histosegnet_grad_cam(model, to_tensor(image)[None])[0].numpy())


def test_image_label_keeps_long_names_apart():
    stems = ["TCGA-1H-ISB9-DX1_xmin20543_ymin18400_MPP-0.2500", "TCGA-1H-ISB9-DX1_xmin22995_ymin64290_MPP-0.2500"]
    labels = [image_label(stem) for stem in stems]
    assert labels[0] != labels[1] and all(len(line) <= 26 for label in labels for line in label.split("\n"))
    assert image_label("short") == "short"


def test_heatmaps_show_cam_and_pathmamba_y1_y2_of_the_lowest_seed_with_a_model(tmp_path, one_torch_thread, captured):
    data_root = tmp_path / "data"
    make_synthetic_dataset(DATASET, data_root, n_train=4, n_val=2, n_test=2, size=32, seed=0)
    experiment_dir = tmp_path / "experiment"
    cam = save_tiny_model(experiment_dir, "cam", 2)
    save_tiny_model(experiment_dir, "pathmamba", 1)
    pathmamba = save_tiny_model(experiment_dir, "pathmamba", 2)  # not shown: seed 1 is the lowest with a model
    write_run(experiment_dir, DATASET, "pathmamba", 0, scores_of(0.5))  # finished run without model.pt: skipped

    columns = plots._heatmap_columns(DATASET, experiment_dir, ["unet", "cam", "pathmamba"], [0, 1, 2])
    assert [(c["method"], c["seed"], c["heatmap"].title) for c in columns] == [
        ("cam", 2, "class activation map"), ("pathmamba", 1, "Y\u2032 (MIML fused map)"),
        ("pathmamba", 1, "Y\u2033 (CMB map)")]
    image = read_image(index_dataset(data_root, get_dataset_spec(DATASET)).test[0][0])
    maps = [class_heatmap(column, image) for column in columns]
    for heat in maps:
        assert heat.shape == (4, 32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert np.allclose(maps[0].max(axis=(1, 2))[maps[0].max(axis=(1, 2)) > 0], 1)  # CAM: divided by its max
    assert not np.allclose(maps[1], maps[2])
    with torch.no_grad():
        x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
        x = ((x / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
             / torch.tensor([0.229, 0.224, 0.225])[:, None, None])[None]
        seed2_y1 = pathmamba.eval()(x)["y1"][0].numpy()
        cam_maps = torch.relu(cam.eval().class_maps(x))
    assert not np.allclose(maps[1], seed2_y1, atol=1e-4)  # another seed's weights: the right model was loaded
    # CAM: ReLU'd, resized to the image, divided by each class's maximum, as the CAM family's predict does
    expected = torch.nn.functional.interpolate(cam_maps, size=(32, 32), mode="bilinear", align_corners=False)
    expected = expected / expected.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    np.testing.assert_allclose(maps[0], expected[0].numpy(), atol=1e-5)

    paths = plots.class_heatmaps(DATASET, data_root, experiment_dir, ["cam", "pathmamba"], [0, 1, 2],
                                 tmp_path / "figures" / "heatmaps", n_images=2)
    assert all(path.stat().st_size > 1000 for path in paths)
    axes = captured["heatmaps"].axes
    titles = [axis.get_title() for axis in axes[:4]]
    assert titles[0] == "image + ground truth" and "Y\u2032" in titles[2] and "Y\u2033" in titles[3]
    assert "CAM: ReLU, divided by its maximum; Y\u2032: sigmoid; Y\u2033: sigmoid" in captured["heatmaps"].axes[-1].get_xlabel()
    assert "class:" in axes[0].get_ylabel()


def write_confusion(experiment_dir, method, seed, cells: dict):
    folder = write_run(experiment_dir, DATASET, method, seed, scores_of(0.5))
    row = {"image": "a.png", "mDice": 0.5, "mIoU": 0.5, "mPrecision": 0.5, "mRecall": 0.5, "pixels": 1,
           **dict.fromkeys(confusion_columns(4), 0), **cells}
    pd.DataFrame([row, {**row, "image": "b.png", **dict.fromkeys(confusion_columns(4), 0)}]).to_csv(
        folder / "per_image.csv", index=False)


def test_confusion_matrix_sums_images_and_seeds_and_normalises_rows(tmp_path, captured):
    experiment_dir = tmp_path / "experiment"
    write_confusion(experiment_dir, "cam", 0, {"cm_t0_p0": 30, "cm_t0_p1": 10})
    write_confusion(experiment_dir, "cam", 1, {"cm_t0_p0": 50, "cm_t0_p2": 10, "cm_t1_p1": 20})
    write_confusion(experiment_dir, "trivial", None, {"cm_t2_p2": 5, "cm_t2_p3": 15})
    per_image = load_per_image(finished_runs(experiment_dir, Grid([DATASET], ["cam", "pathmamba"], [0, 1])))

    matrix = normalised_confusion(per_image, DATASET, "cam")
    assert np.allclose(matrix[:2], [[0.8, 0.1, 0.1, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert np.isnan(matrix[2:]).all()  # no pixel of those classes

    plots.confusion_matrices(per_image, DATASET, list(get_dataset_spec(DATASET).classes), ["cam", "pathmamba"],
                             tmp_path / "figures" / "confusion")
    panels = [axis for axis in captured["confusion"].axes if axis.images and axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["cam (2 seeds)", "trivial"]  # pathmamba never ran
    for axis in panels:
        plotted = np.ma.filled(axis.images[0].get_array().astype(float), np.nan)
        sums = np.nansum(plotted, axis=1)[~np.isnan(plotted).all(axis=1)]
        assert np.allclose(sums, 1)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == list(get_dataset_spec(DATASET).classes)


def test_training_curves_share_a_normalised_epoch_axis(tmp_path, captured):
    experiment_dir = tmp_path / "experiment"
    for method, epochs in (("unet", 60), ("cam", 5)):
        folder = run_path(experiment_dir, DATASET, method, 0)
        folder.mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, epochs + 1), "loss": 1.0, "val_mIoU": 0.5}).to_csv(
            folder / "history.csv", index=False)
        (folder / "run.json").write_text(json.dumps({"settings": {"epochs": epochs}}))
    histories = with_progress(load_histories(experiment_dir, [DATASET], ["cam", "unet"], [0]))
    ends = histories.groupby("method")["progress"].agg(["min", "max"])
    assert ends.loc["unet"].tolist() == [1 / 60, 1.0] and ends.loc["cam"].tolist() == [0.2, 1.0]

    plots.training_curves(load_histories(experiment_dir, [DATASET], ["cam", "unet"], [0]), [DATASET], ["cam", "unet"],
                          tmp_path / "figures" / "curves")
    lines = [line for line in captured["curves"].axes[1].get_lines() if len(line.get_xdata()) > 1]
    assert len(lines) == 2 and all(line.get_xdata().max() == 1.0 for line in lines)
    assert {line.get_label() for line in lines} == {"cam (5 epochs)", "unet (60 epochs)"}
    assert lines[0].get_marker() != lines[1].get_marker()


def test_seed_spread_and_ablation_draw_the_trivial_reference_and_method_styles(tmp_path, captured):
    experiment_dir = tmp_path / "experiment"
    for method, values in (("pathmamba-b", (0.4, 0.5)), ("pathmamba", (0.6, 0.7))):
        for seed, value in enumerate(values):
            write_run(experiment_dir, DATASET, method, seed, scores_of(value))
    write_run(experiment_dir, DATASET, "trivial", None, scores_of(0.3))
    runs = finished_runs(experiment_dir, Grid([DATASET], ["pathmamba-b", "pathmamba"], [0, 1]))
    metrics = plots.load_metrics([p / "test_metrics.json" for p in runs.loc[runs["method"] != "trivial", "path"]])
    trivial = plots.load_metrics([p / "test_metrics.json" for p in runs.loc[runs["method"] == "trivial", "path"]])
    styles = method_styles(["pathmamba-b", "pathmamba"])
    plots.seed_spread(metrics, {}, [DATASET], ["pathmamba-b", "pathmamba"], tmp_path / "spread", trivial=trivial,
                      styles=styles)
    plots.ablation_steps(metrics, {}, [DATASET], ["pathmamba-b", "pathmamba"], {}, tmp_path / "ablation",
                         trivial=trivial, styles=styles)
    for name in ("spread", "ablation"):
        axis = captured[name].axes[0]
        dashed = [line for line in axis.get_lines() if line.get_linestyle() == TRIVIAL_LINE["linestyle"]]
        assert [tuple(line.get_ydata()) for line in dashed] == [(0.3, 0.3)], name
        assert "trivial reference" in [t.get_text() for t in captured[name].legends[0].get_texts()]
    markers = {collection.get_paths()[0].vertices.tobytes() for collection in captured["spread"].axes[0].collections
               if len(collection.get_offsets()) == 2 and collection.get_edgecolor().size}
    assert len(markers) == 2  # the two methods' dots have different markers


def test_every_method_has_its_own_colour_and_marker_none_the_references():
    styles = method_styles(method_names())
    pairs = {(matplotlib.colors.to_hex(style["color"]), style["marker"]) for style in styles.values()}
    assert len(pairs) == len(method_names())
    assert PAPER_MARKER["marker"] not in {style["marker"] for style in styles.values()}
    greys = {matplotlib.colors.to_hex(TRIVIAL_LINE["color"]), "#949494"}
    assert not greys & {matplotlib.colors.to_hex(style["color"]) for style in styles.values()}


def test_colour_mask_uses_the_dataset_palette():
    spec = get_dataset_spec("synthetic-bcss")
    rgb = colour_mask(np.array([[0, 1], [3, 4]]), spec.palette)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [153, 0, 255]
    assert rgb[1, 1].tolist() == [255, 255, 255]
