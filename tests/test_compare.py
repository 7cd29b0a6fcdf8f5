"""``python -m pathmamba compare``: two experiment folders, a run against the README's table and against the
paper's values, on hand-written experiment folders whose numbers come from known confusion matrices."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, cli_error
from scipy import stats as scipy_stats

from pathmamba.cli import main
from pathmamba.data.specs import get_dataset_spec
from pathmamba.engine.metrics import METRICS, confusion_columns, scores_from_confusion
from pathmamba.reporting.compare import CSV_COLUMNS, MARKDOWN_SIGNATURE, compare
from pathmamba.reporting.readme import splice_readme
from pathmamba.reporting.results import Grid
from pathmamba.reporting.tables import write_tables

PAPER = REPO / "config" / "paper_results.yaml"
DATASET = "synthetic-luad"
#: True pixels of each tissue class in each of 12 test images: the same test split for every run.
TRUTH = np.random.default_rng(0).integers(50, 400, size=(12, 4))
AVX2_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE,STRICT",
             "OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"}


def environment(host: str = "workstation", cpu_model: str = "AMD EPYC 7B13", gpu: str | None = None,
                pinned: bool = True, threads: int = 1) -> dict:
    """An environment record as pathmamba.core.environment.environment_record writes it."""
    return {"pathmamba_version": "0.1.0", "python": "3.11.9", "torch": "2.14.1", "numpy": "2.3.0",
            "packages": {"scipy": "1.16.0"}, "device": "cuda:0" if gpu else "cpu", "device_name": gpu or "x86_64",
            "device_memory_gb": 80.0 if gpu else None, "cuda": "12.8", "cuda_driver": "580.1" if gpu else None,
            "cuda_visible_devices": "0" if gpu else None, "gpu_slot": {"gpu": "0", "pool": ["0"]} if gpu else None,
            "scan": "fused" if gpu else "pytorch", "precision": "bf16" if gpu else "fp32", "threads": threads,
            "cpu": {"model": cpu_model, "vendor": "AuthenticAMD" if "AMD" in cpu_model else "GenuineIntel",
                    "isa_flags": ["avx2"] if "AMD" in cpu_model else ["avx2", "avx512f"],
                    "pins_requested": "avx2" if pinned else "native",
                    "pins": AVX2_PINS if pinned else dict.fromkeys(AVX2_PINS),
                    "capability": "AVX2" if pinned or "AMD" in cpu_model else "AVX512",
                    "pinned_isa": "avx2" if pinned else None},
            "host": host, "git_commit": "b23c7d7", "git_dirty": False}


def evaluation(quality: float, noise_seed: int) -> np.ndarray:
    """Per-image confusion matrices (12, 4, 4) of a model that gets about ``quality`` of each class's pixels
    right (the rest go to the next class)."""
    share = np.clip(quality + np.random.default_rng(noise_seed).normal(0, 0.05, size=TRUTH.shape), 0, 1)
    correct = np.round(TRUTH * share).astype(int)
    classes = np.arange(4)
    matrices = np.zeros((len(TRUTH), 4, 4), dtype=int)
    matrices[:, classes, classes] = correct
    matrices[:, classes, (classes + 1) % 4] = TRUTH - correct
    return matrices


def write_run(experiment_dir: Path, method: str, seed: int | None, matrices: np.ndarray, env: dict | None = None,
              settings: dict | None = None, dataset: str = DATASET) -> Path:
    """A finished run as train and evaluate write it: run.json (settings, environment; none for the trivial
    reference), test_metrics.json (scores of the summed matrices) and per_image.csv (a row per image)."""
    folder = experiment_dir / "runs" / dataset / method / ("" if seed is None else f"seed{seed}")
    folder.mkdir(parents=True)
    env = env or environment()
    scores = scores_from_confusion(matrices.sum(0))
    protocol = {**scores, "confusion": matrices.sum(0).tolist()}
    record = {"method": method, "dataset": dataset, "seed": seed, "classes": list(get_dataset_spec(dataset).classes),
              "tta": False, "test_images": len(matrices),
              "protocols": {"ignore_background": protocol, "with_background": protocol}}
    if seed is not None:
        record["environment"] = env
        run = {"method": method, "stage": None, "dataset": dataset, "seed": seed, "hparams": {"pretrained": "none"},
               "settings": {"epochs": 5, "lr": 0.001, "workers": 0, "device": "auto", **(settings or {})},
               "data_root": str(experiment_dir / "data"), "best_epoch": 3, "wall_seconds_this_run": 10.0 + seed,
               "environment": env}
        (folder / "run.json").write_text(json.dumps(run))
    (folder / "test_metrics.json").write_text(json.dumps(record))
    rows = [{"image": f"img{i:02d}.png", **{metric: scores_from_confusion(matrix)[metric] for metric in METRICS},
             "pixels": int(matrix.sum()), **dict(zip(confusion_columns(4), matrix.reshape(-1).tolist(), strict=True))}
            for i, matrix in enumerate(matrices)]
    pd.DataFrame(rows).to_csv(folder / "per_image.csv", index=False)
    return folder


#: Per method, each seed's quality: cam learns about 0.6 of each class, pathmamba 0.8.
QUALITY = {"cam": 0.6, "pathmamba": 0.8}


def write_demo(experiment_dir: Path, seeds=(0, 1, 2), shift: dict | None = None, env: dict | None = None,
               settings: dict | None = None, machine: int = 0) -> Path:
    """An experiment folder of cam and pathmamba on DATASET with ``seeds`` and the trivial reference. ``shift``:
    a quality change per method; ``machine``: another machine's last bits (different per-seed noise)."""
    for method, quality in QUALITY.items():
        for seed in seeds:
            seed_quality = quality + 0.03 * (seed % 3 - 1) + (shift or {}).get(method, 0.0)
            write_run(experiment_dir, method, seed, evaluation(seed_quality, 100 * seed + machine), env, settings)
    write_run(experiment_dir, "trivial", None, evaluation(0.5, 999))
    return experiment_dir


def rows_of(comparison) -> pd.DataFrame:
    return comparison.rows.set_index(["method", "metric"])


def test_a_experiment_folder_against_a_copy_of_itself_is_identical_everywhere(tmp_path):
    experiment_dir = write_demo(tmp_path / "results" / "demo")
    comparison = compare(experiment_dir, experiment_dir, n_resamples=200)
    assert set(comparison.rows["verdict"]) == {"identical"}
    assert len(comparison.rows) == 3 * 4 and not comparison.one_sided
    assert (comparison.rows["difference"] == 0).all()
    row = rows_of(comparison).loc[("cam", "mIoU")]
    assert row["seeds_interval"].startswith("Welch t, df") and row["images_interval"] == "paired bootstrap, 12 images"
    assert row["images_low"] == row["images_high"] == 0.0


def test_another_machine_of_the_same_configuration_is_within_seed_noise_or_differs(tmp_path):
    """Use case (a): the same config on another machine: other hardware keys, other last bits."""
    mine = write_demo(tmp_path / "mine", env=environment(host="ws", cpu_model="AMD EPYC 7B13"))
    theirs = write_demo(tmp_path / "theirs", machine=1, shift={"pathmamba": -0.15},
                        env=environment(host="node7", cpu_model="Intel Xeon Platinum 8480+"))
    comparison = compare(mine, theirs, n_resamples=500)
    rows = rows_of(comparison)
    cam = rows.loc[("cam", "mIoU")]
    a = [scores_from_confusion(evaluation(0.6 + 0.03 * (s - 1), 100 * s).sum(0))["mIoU"] for s in range(3)]
    b = [scores_from_confusion(evaluation(0.6 + 0.03 * (s - 1), 100 * s + 1).sum(0))["mIoU"] for s in range(3)]
    welch = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert cam["a_mean"] == pytest.approx(np.mean(a), abs=1e-12) and cam["b_mean"] == pytest.approx(np.mean(b), abs=1e-12)
    assert (cam["seeds_low"], cam["seeds_high"]) == (pytest.approx(welch.low), pytest.approx(welch.high))
    assert cam["verdict"] == "within seed noise"
    assert rows.loc[("pathmamba", "mIoU"), "verdict"] == "differs"
    assert rows.loc[("pathmamba", "mIoU"), "images_high"] > 0.1  # A is better on the same images
    assert rows.loc[("trivial", "mIoU"), "verdict"] == "identical"  # computed from masks only
    assert comparison.notes[1:3] == ["Hardware of A: 6 runs on CPU pinned to AVX2 (CPU AMD EPYC 7B13, host ws).",
                                     ("Hardware of B: 6 runs on CPU pinned to AVX2 (CPU Intel Xeon Platinum 8480+, "
                                      "host node7).")]
    assert comparison.notes[0].startswith("Configuration: every run's run.json and test_metrics.json are the same")


def test_runs_on_two_gpu_models_compare_and_name_them(tmp_path):
    a100 = write_demo(tmp_path / "a100", env=environment(gpu="NVIDIA A100-SXM4-80GB"))
    h100 = write_demo(tmp_path / "h100", machine=1, env=environment(gpu="NVIDIA H100 80GB HBM3", host="node2"))
    comparison = compare(a100, h100, n_resamples=100)
    assert comparison.notes[1:3] == [
        "Hardware of A: 6 runs on GPU NVIDIA A100-SXM4-80GB, CPU pinned to AVX2 (CPU AMD EPYC 7B13, host workstation).",
        "Hardware of B: 6 runs on GPU NVIDIA H100 80GB HBM3, CPU pinned to AVX2 (CPU AMD EPYC 7B13, host node2)."]


def test_other_seeds_of_the_same_configuration_are_compared_over_seeds(tmp_path):
    first = write_demo(tmp_path / "first")
    other = write_demo(tmp_path / "other", seeds=(3, 4, 5))
    rows = rows_of(compare(first, other, n_resamples=100))
    assert rows.loc[("cam", "mIoU"), "a_seeds"] == "0,1,2" and rows.loc[("cam", "mIoU"), "b_seeds"] == "3,4,5"
    assert rows.loc[("cam", "mIoU"), "verdict"] == "within seed noise"


def test_configurations_that_differ_beyond_hardware_are_refused_naming_the_keys(tmp_path, capsys):
    pinned = write_demo(tmp_path / "pinned")
    unpinned = write_demo(tmp_path / "unpinned", env=environment(pinned=False, threads=2), settings={"epochs": 10})
    message = cli_error(["compare", str(pinned), str(unpinned)], capsys)
    assert message.startswith(f"pathmamba compare: A ({pinned}) and B ({unpinned}) differ in configuration, "
                               "not only in hardware: ")
    refused = message.split("--accept ")[1].split(" to compare")[0].split()
    assert refused == ["environment.cpu.pinned_isa", "environment.cpu.pins.ATEN_CPU_CAPABILITY",
                       "environment.cpu.pins.MKL_CBWR", "environment.cpu.pins.NPY_DISABLE_CPU_FEATURES",
                       "environment.cpu.pins.ONEDNN_MAX_CPU_ISA", "environment.cpu.pins.OPENBLAS_CORETYPE",
                       "environment.cpu.pins_requested", "environment.threads", "settings.epochs"]
    assert "settings.epochs (synthetic-luad cam: A 5, B 10)" in message
    assert 'environment.cpu.pinned_isa (synthetic-luad cam: A "avx2", B null)' in message
    assert "environment.cpu.model" not in message and "host" not in message  # hardware
    accept = ["environment.cpu", "environment.threads", "settings.epochs"]  # a key accepts the keys under it
    comparison = compare(pinned, unpinned, accept, n_resamples=100)
    assert comparison.notes[0].startswith("Configuration: the same but for the hardware keys and these accepted "
                                          "differences (--accept): environment.cpu.pinned_isa (synthetic-luad cam:")
    assert comparison.notes[2] == "Hardware of B: 6 runs on CPU AMD EPYC 7B13 unpinned (host workstation)."


def test_a_difference_of_the_evaluation_alone_is_named_as_such(tmp_path, capsys):
    mine = write_demo(tmp_path / "mine")
    theirs = write_demo(tmp_path / "theirs")
    test_metrics = theirs / "runs" / DATASET / "cam" / "seed2" / "test_metrics.json"
    test_metrics.write_text(json.dumps({**json.loads(test_metrics.read_text()), "tta": True}))
    message = cli_error(["compare", str(mine), str(theirs)], capsys)
    assert "not only in hardware: tta (synthetic-luad cam: A false, B false / true, in test_metrics.json); " in message


def test_run_json_outcomes_locations_and_loader_workers_are_not_configuration(tmp_path):
    mine = write_demo(tmp_path / "mine", settings={"workers": 0})
    theirs = write_demo(tmp_path / "theirs", settings={"workers": 7, "device": "cuda"})
    for run_json in theirs.glob("runs/*/*/seed*/run.json"):
        record = json.loads(run_json.read_text())
        record.update(data_root="/scratch/elsewhere", best_epoch=1, wall_seconds_this_run=99.0)
        run_json.write_text(json.dumps(record))
    assert set(compare(mine, theirs, n_resamples=50).rows["verdict"]) == {"identical"}


def test_a_cell_with_one_seed_is_decided_by_the_test_images_and_cells_on_one_side_are_listed(tmp_path):
    one = write_demo(tmp_path / "one", seeds=(0,))
    three = write_demo(tmp_path / "three", seeds=(0, 1, 2))
    write_run(three, "unet", 0, evaluation(0.9, 5))
    comparison = compare(one, three, n_resamples=300)
    row = rows_of(comparison).loc[("cam", "mIoU")]
    assert row["seeds_interval"] == "fewer than 2 seeds in A" and math.isnan(row["seeds_low"])
    assert row["verdict"] in ("within image noise", "differs")
    assert row["verdict"] == ("within image noise" if row["images_low"] <= 0 <= row["images_high"] else "differs")
    assert comparison.one_sided == [(DATASET, "unet")]
    assert f"Not compared, on one side only: {DATASET} unet." in comparison.notes


def test_different_test_images_get_no_image_interval(tmp_path):
    mine = write_demo(tmp_path / "mine")
    theirs = write_demo(tmp_path / "theirs")
    per_image = theirs / "runs" / DATASET / "cam" / "seed1" / "per_image.csv"
    frame = pd.read_csv(per_image)
    frame.loc[0, "cm_t0_p0"] += 1  # the same names, another ground truth
    frame.to_csv(per_image, index=False)
    row = rows_of(compare(mine, theirs, n_resamples=50)).loc[("cam", "mIoU")]
    assert row["images_interval"] == "same image names, different ground truth" and math.isnan(row["images_low"])
    frame.loc[0, "image"] = "another.png"
    frame.to_csv(per_image, index=False)
    row = rows_of(compare(mine, theirs, n_resamples=50)).loc[("cam", "mIoU")]
    assert row["images_interval"] == "the sides scored different test images"


def readme_of(experiment_dir: Path, tmp_path: Path) -> Path:
    """A README whose results section is this run's Table 1, as `make demo` then `make readme` write it."""
    write_tables(experiment_dir, Grid([DATASET], list(QUALITY), [0, 1, 2]), PAPER, tmp_path / "tables", n_resamples=20)
    readme = tmp_path / "README.md"
    readme.write_text("# Demo\n\n<!-- results:start -->\n<!-- results:end -->\n\nMore text.\n")
    splice_readme(readme, tmp_path / "tables" / "table1_comparison.md")
    return readme


def test_this_checkouts_run_against_the_readme_table(tmp_path):
    """Use case (b): only means ± std and seed counts are published: a Welch interval from them."""
    experiment_dir = write_demo(tmp_path / "demo")
    readme = readme_of(experiment_dir, tmp_path)
    comparison = compare(experiment_dir, readme, n_resamples=20)
    assert set(comparison.rows["verdict"]) == {"identical"} and len(comparison.rows) == 12
    assert any(note.startswith("B is a published table: means ± std with three decimals") for note in comparison.notes)

    other = write_demo(tmp_path / "other-machine", machine=1, shift={"pathmamba": -0.2})
    rows = rows_of(compare(other, readme, n_resamples=20))
    cam = rows.loc[("cam", "mIoU")]
    published = readme.read_text().split("| cam |")[1].split("|")[3].strip()  # mIoU: "mean ± std"
    mean, std = (float(value) for value in published.split(" ± "))
    assert cam["b_mean"] == mean and cam["b_std"] == std and cam["b_n"] == 3
    # Three values m - s, m, m + s have mean m and std s: scipy's Welch interval from the published numbers.
    welch = scipy_stats.ttest_ind(cam["a_mean"] + cam["a_std"] * np.array([-1, 0, 1]),
                                  mean + (std + 0.0005) * np.array([-1, 0, 1]), equal_var=False).confidence_interval()
    assert (cam["seeds_low"], cam["seeds_high"]) == (pytest.approx(welch.low - 0.0005),
                                                     pytest.approx(welch.high + 0.0005))
    assert cam["seeds_interval"].endswith("B's rounding ±0.0005") and cam["verdict"] == "within seed noise"
    assert rows.loc[("pathmamba", "mIoU"), "verdict"] == "differs"
    trivial = rows.loc[("trivial", "mIoU")]
    assert trivial["verdict"] == "identical" and trivial["seeds_interval"].startswith("none needed: no seeds")


def test_a_readme_row_marked_for_mixed_hardware_and_a_missing_row_are_read(tmp_path):
    experiment_dir = write_demo(tmp_path / "demo")
    readme = readme_of(experiment_dir, tmp_path)
    text = readme.read_text().replace("| cam |", "| cam † |")
    readme.write_text(text.replace("| pathmamba | weak (image labels) | 3 |",
                                   "| pathmamba | weak (image labels) | — |"))
    comparison = compare(experiment_dir, readme, n_resamples=20)
    assert rows_of(comparison).loc[("cam", "mIoU"), "verdict"] == "identical"
    assert comparison.one_sided == [(DATASET, "pathmamba")]


def test_a_run_against_the_papers_values_is_a_one_sample_interval(tmp_path):
    """Use case (c): the paper gives one number per cell; its rounding widens the interval."""
    experiment_dir = tmp_path / "rehearsal"
    for seed, quality in enumerate((0.86, 0.9, 0.88)):
        write_run(experiment_dir, "pathmamba", seed, evaluation(quality, seed), dataset="luad-histoseg")
    write_run(experiment_dir, "cam", 0, evaluation(0.6, 7), dataset="luad-histoseg")
    comparison = compare(experiment_dir, PAPER, n_resamples=400)
    rows = rows_of(comparison)
    miou = [scores_from_confusion(evaluation(q, s).sum(0))["mIoU"] for s, q in enumerate((0.86, 0.9, 0.88))]
    expected = scipy_stats.ttest_1samp(miou, 0.767).confidence_interval(0.95)
    row = rows.loc[("pathmamba", "mIoU")]
    assert row["b_mean"] == 0.767 and row["difference"] == pytest.approx(np.mean(miou) - 0.767, abs=1e-12)
    assert (row["seeds_low"], row["seeds_high"]) == (pytest.approx(expected.low - 0.767 - 0.0005),
                                                     pytest.approx(expected.high - 0.767 + 0.0005))
    assert row["seeds_interval"] == "one-sample t, df 2, B's rounding ±0.0005"
    assert row["verdict"] == ("within seed noise" if row["seeds_low"] <= 0 <= row["seeds_high"] else "differs")
    assert not rows.index.isin([("pathmamba-b", "mIoU")]).any()  # the paper's other rows: not run here
    assert ("luad-histoseg", "cam") in comparison.one_sided  # beyond the paper's Table 1


def test_one_seed_against_the_paper_is_decided_by_its_test_images(tmp_path):
    experiment_dir = tmp_path / "rehearsal"
    write_run(experiment_dir, "pathmamba", 0, evaluation(0.3, 0), dataset="luad-histoseg")
    row = rows_of(compare(experiment_dir, PAPER, n_resamples=300)).loc[("pathmamba", "mIoU")]
    assert row["seeds_interval"] == "fewer than 2 seeds in A"
    assert row["images_interval"] == "bootstrap of A's 12 test images, B's rounding ±0.0005"
    assert row["images_high"] < 0 and row["verdict"] == "differs"


def test_compare_command_prints_markdown_writes_out_files_and_fails_on_request(tmp_path, capsys):
    mine = write_demo(tmp_path / "mine")
    theirs = write_demo(tmp_path / "theirs", machine=1, shift={"pathmamba": -0.15})
    arguments = ["compare", str(mine), str(theirs), "--n-resamples", "100"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"## Comparison: A = {mine}, B = {theirs}\n\n| Dataset | Method | Metric | A | B |")
    assert "| synthetic-luad | trivial | mIoU |" in out and "| identical |" in out and "| differs |" in out
    assert "- Verdicts: " in out and "Welch t, df" in out
    assert main([*arguments, "--fail-on", "differs"]) == 1
    assert main(["compare", str(mine), str(mine), "--n-resamples", "10", "--fail-on", "not-identical"]) == 0

    markdown, table = tmp_path / "comparison.md", tmp_path / "comparison.csv"
    assert main([*arguments, "--out", str(markdown)]) == 0
    assert markdown.read_text().startswith(MARKDOWN_SIGNATURE + "\n## Comparison: A = ")
    assert main([*arguments, "--out", str(table)]) == 0
    written = pd.read_csv(table)
    assert list(written.columns) == CSV_COLUMNS and len(written) == 12
    assert main([*arguments, "--out", str(markdown)]) == 0  # its own file: replaced

    foreign = tmp_path / "notes.md"
    foreign.write_text("my notes\n")
    message = cli_error([*arguments, "--out", str(foreign)], capsys)
    assert message == (f"pathmamba compare: {foreign} exists and is not a comparison written by this tool; not "
                       "overwriting it: give another --out, or remove it yourself")
    assert foreign.read_text() == "my notes\n"
    assert "--out" in cli_error([*arguments, "--out", str(tmp_path / "c.txt")], capsys)


@pytest.mark.parametrize(("b", "expected"), [
    ("missing.json", "is neither an experiment folder (results/<experiment>), a README with a results section (.md) nor"),
    ("README.md", "has no results section between <!-- results:start --> and <!-- results:end -->"),
])
def test_a_b_that_is_none_of_the_three_is_refused(tmp_path, capsys, b, expected):
    experiment_dir = write_demo(tmp_path / "demo")
    (tmp_path / "README.md").write_text("# no results\n")
    assert expected in cli_error(["compare", str(experiment_dir), str(tmp_path / b)], capsys)


def test_folders_without_runs_or_in_common_are_refused(tmp_path, capsys):
    experiment_dir = write_demo(tmp_path / "demo")
    (tmp_path / "empty").mkdir()
    assert cli_error(["compare", str(tmp_path / "empty"), str(experiment_dir)], capsys) == (
        f"pathmamba compare: A: {tmp_path / 'empty'} holds no finished run "
        "(runs/<dataset>/<method>/seed<N>/test_metrics.json)")
    message = cli_error(["compare", str(experiment_dir), str(PAPER)], capsys)
    assert "have no dataset and method in common: A has synthetic-luad cam, synthetic-luad pathmamba" in message


def test_every_row_of_the_repository_readmes_results_section_is_read():
    from pathmamba.reporting.compare import read_readme
    from pathmamba.reporting.readme import RESULTS_END, RESULTS_START

    section = (REPO / "README.md").read_text().split(RESULTS_START)[1].split(RESULTS_END)[0]
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| Method |") and "| — |" not in line]
    cells = read_readme(REPO / "README.md")
    assert len(cells) == len(rows) > 0
    assert all(cell.n >= 1 and set(cell.mean) == set(METRICS) for cell in cells.values())
