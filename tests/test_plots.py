"""Figures: every file written (PNG + PDF, non-empty), the qualitative grid at its exact pixel size."""

import json

import numpy as np
import pandas as pd
from conftest import REPO
from PIL import Image
from test_tables import scores_of, write_run

from pathmamba.data.readers import index_dataset, read_mask
from pathmamba.data.specs import get_dataset_spec
from pathmamba.data.synthetic import make_synthetic_dataset
from pathmamba.evaluate import save_palette_mask
from pathmamba.plots import colour_mask, grid_pixel_size, write_figures
from pathmamba.results import load_paper_results

DATASET = "synthetic-luad"
FIGURES = ["qualitative_synthetic-luad", "miou_over_seeds", "ablation", "training_curves", "compute_cost"]


def fake_training(run_dir, method, seed, spec, test_pairs, value):
    """Masks (ground truth with class 0 everywhere scored), history, run.json and benchmark of one run."""
    folder = write_run(run_dir, DATASET, method, seed, scores_of(value))
    (folder / "masks").mkdir()
    for image, mask in test_pairs[:2]:
        truth = read_mask(mask, spec)
        save_palette_mask(np.where(truth == 4, 4, 0), spec.flat_palette, folder / "masks" / image.name)
    pd.DataFrame({"epoch": [1, 2], "loss": [0.7, 0.5 - seed / 10], "val_mIoU": [0.2, value]}).to_csv(
        folder / "history.csv", index=False)
    (folder / "run.json").write_text(json.dumps({"environment": {"device": "cpu"}}))
    bench = run_dir / "benchmarks" / DATASET / method / f"seed{seed}"
    bench.mkdir(parents=True)
    (bench / "train.tsv").write_text(f"s\th:m:s\tmax_rss\n{3600 * value:.2f}\t0:00:01\t800.0\n")


def test_all_figures_are_written_for_a_partial_grid(tmp_path):
    spec = get_dataset_spec(DATASET)
    data_root = tmp_path / "data"
    make_synthetic_dataset(DATASET, data_root, n_train=4, n_val=2, n_test=3, size=32, seed=0)
    test_pairs = sorted(index_dataset(data_root, spec).test, key=lambda pair: pair[0].name)
    run_dir = tmp_path / "run"
    for seed, value in ((0, 0.5), (1, 0.6)):
        fake_training(run_dir, "pathmamba", seed, spec, test_pairs, value)
    fake_training(run_dir, "pathmamba-b", 1, spec, test_pairs, 0.4)
    methods = ["pathmamba-b", "cam", "pathmamba"]  # cam never ran

    written = write_figures(run_dir, [DATASET], methods, [0, 1], {DATASET: data_root},
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


def test_colour_mask_uses_the_dataset_palette():
    spec = get_dataset_spec("synthetic-bcss")
    rgb = colour_mask(np.array([[0, 1], [3, 4]]), spec.palette)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [153, 0, 255]
    assert rgb[1, 1].tolist() == [255, 255, 255]
