"""The paper's tables (finding runs, tables, rendering, README splicing), on hand-built experiment folders with
known numbers."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, cli_error

from pathmamba.cli import main
from pathmamba.data.specs import get_dataset_spec
from pathmamba.engine import registry
from pathmamba.engine.metrics import METRICS, confusion_columns
from pathmamba.reporting.readme import splice_readme
from pathmamba.reporting.render import INCONSISTENT_MARK, latex_results
from pathmamba.reporting.results import Grid, finished_runs, load_metrics, load_paper_results
from pathmamba.reporting.tables import dice_iou_inconsistent, results_table, supervision_of, write_tables

PAPER = REPO / "config" / "paper_results.yaml"


def write_run(experiment_dir: Path, dataset: str, method: str, seed, scores: dict, per_image: dict | None = None,
              with_background: dict | None = None) -> Path:
    """A finished run as evaluation writes it: test_metrics.json (both protocols) and per_image.csv.

    scores: the four m-metrics plus ``IoU`` (per-class list); per_image: ``{image name: mIoU}``.
    """
    folder = experiment_dir / "runs" / dataset / method / ("" if seed is None else f"seed{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    protocol = {metric: scores[metric] for metric in METRICS}
    protocol["per_class"] = {"IoU": scores.get("IoU", [scores["mIoU"]] * 4)}
    other = dict(protocol, **(with_background or {}))
    record = {"method": method, "dataset": dataset, "seed": seed, "classes": list(get_dataset_spec(dataset).classes),
              "protocols": {"ignore_background": protocol, "with_background": other}}
    (folder / "test_metrics.json").write_text(json.dumps(record))
    per_image = per_image or {"a.png": scores["mIoU"]}
    # Every image a perfect 100-pixel class-0 matrix: only the per-image view's numbers are set here.
    perfect = dict.fromkeys(confusion_columns(4), 0) | {"cm_t0_p0": 100}
    rows = [{"image": name, "mDice": v, "mIoU": v, "mPrecision": v, "mRecall": v, "pixels": 100, **perfect}
            for name, v in per_image.items()]
    pd.DataFrame(rows).to_csv(folder / "per_image.csv", index=False)
    return folder


def scores_of(value: float, **overrides) -> dict:
    return {**{metric: value for metric in METRICS}, **overrides}


@pytest.fixture()
def partial_run(tmp_path):
    """luad-histoseg: pathmamba 3 seeds (mIoU 0.5/0.6/0.7), cam only seeds 0 and 1, pathmamba-b none."""
    experiment_dir = tmp_path / "results" / "r"
    images = ["i0.png", "i1.png", "i2.png", "i3.png"]
    for seed, value in zip((0, 1, 2), (0.5, 0.6, 0.7), strict=True):
        write_run(experiment_dir, "luad-histoseg", "pathmamba", seed,
                  scores_of(value, mDice=0.8 + 0.01 * seed, IoU=[value, value + 0.1, value - 0.1, value]),
                  per_image={name: value + 0.1 * i for i, name in enumerate(images)},
                  with_background={"mIoU": value / 2})
    for seed, value in zip((0, 1), (0.3, 0.4), strict=True):
        write_run(experiment_dir, "luad-histoseg", "cam", seed, scores_of(value),
                  per_image={name: value for name in images})
    write_run(experiment_dir, "luad-histoseg", "trivial", None, scores_of(0.2), per_image={name: 0.2 for name in images})
    grid = Grid(["luad-histoseg"], ["cam", "pathmamba-b", "pathmamba"], [0, 1, 2])
    return experiment_dir, grid


def test_paper_results_transcribe_table1_and_table2():
    paper = load_paper_results(PAPER)
    assert paper["table1"]["bcss-wsss"]["histosegnet"]["mIoU"] == 0.276
    assert paper["table1"]["luad-histoseg"]["unet"] == {"label": "UNet [16]", "mDice": 0.840, "mIoU": 0.770,
                                                         "mPrecision": 0.862, "mRecall": 0.855}
    assert list(paper["table2"]["luad-histoseg"]) == ["pathmamba-b", "pathmamba-b-miml", "pathmamba-b-cmb",
                                                      "pathmamba-b-miml-cmb", "pathmamba"]
    # The paper's full model (Table 2 f) is its Table 1 LUAD row.
    full = paper["table2"]["luad-histoseg"]["pathmamba"]
    assert {m: full[m] for m in METRICS} == {m: paper["table1"]["luad-histoseg"]["pathmamba"][m] for m in METRICS}


def test_paper_results_reject_a_missing_metric(tmp_path):
    bad = tmp_path / "paper.yaml"
    bad.write_text("table1: {luad-histoseg: {cam: {mDice: 0.5}}}\ntable2: {}\n")
    with pytest.raises(ValueError, match=r"table1.luad-histoseg.cam lacks numeric mIoU, mPrecision, mRecall"):
        load_paper_results(bad)


def test_partial_grid_gives_exact_means_flags_and_missing_cells(partial_run):
    experiment_dir, grid = partial_run
    runs = finished_runs(experiment_dir, grid)
    assert sorted(runs["method"].unique()) == ["cam", "pathmamba", "trivial"]
    metrics = load_metrics([Path(p) / "test_metrics.json" for p in runs["path"]])
    table = results_table(metrics, [*grid.methods, "trivial"], grid.datasets, 3,
                          load_paper_results(PAPER)["table1"])
    cell = table.set_index(["method", "metric"])
    assert cell.loc[("pathmamba", "mIoU"), "mean"] == pytest.approx(0.6, abs=1e-12)
    assert cell.loc[("pathmamba", "mIoU"), "std"] == pytest.approx(0.1, abs=1e-12)
    assert cell.loc[("pathmamba", "mIoU"), "paper"] == 0.767
    assert cell.loc[("pathmamba", "mIoU"), "difference"] == pytest.approx(0.6 - 0.767, abs=1e-12)
    assert cell.loc[("pathmamba", "mDice"), "mean"] == pytest.approx(0.81, abs=1e-12)
    assert cell.loc[("pathmamba", "mIoU"), "status"] == "complete"
    assert cell.loc[("cam", "mIoU"), "status"] == "incomplete"
    assert cell.loc[("cam", "mIoU"), "n_seeds"] == 2
    assert cell.loc[("cam", "mIoU"), "std"] == pytest.approx(math.sqrt(0.005), abs=1e-12)
    assert math.isnan(cell.loc[("cam", "mIoU"), "paper"])
    assert cell.loc[("pathmamba-b", "mIoU"), "status"] == "missing"
    assert cell.loc[("trivial", "mIoU"), "status"] == "complete"
    assert cell.loc[("trivial", "mIoU"), "supervision"].startswith("reference")
    assert cell.loc[("pathmamba", "mIoU"), "best"] and not cell.loc[("cam", "mIoU"), "best"]
    assert not cell.loc[("trivial", "mIoU"), "best"]


def test_write_tables_on_a_partial_grid(partial_run, tmp_path):
    experiment_dir, grid = partial_run
    out = tmp_path / "tables"
    tables = write_tables(experiment_dir, grid, PAPER, out, n_resamples=500, bootstrap_seed=3)
    for name in ("table1_comparison.csv", "table1_comparison.md", "table1_comparison.tex",
                 "table2_ablation.csv", "table2_ablation.md", "table2_ablation.tex", "per_class_iou.csv",
                 "per_class_iou.md", "sensitivity_with_background.csv", "sensitivity_with_background.md",
                 "statistics.csv", "statistics.md", "comparison.csv", "comparison.md", "table1_comparison.html",
                 "table2_ablation.html", "per_class_iou.html", "sensitivity_with_background.html", "statistics.html"):
        assert (out / name).stat().st_size > 0, name

    table1 = (out / "table1_comparison.md").read_text()
    pathmamba_line = next(line for line in table1.splitlines() if line.startswith("| pathmamba |"))
    assert "**0.600** ± 0.100 (paper 0.767, Δ −0.167)" in pathmamba_line
    html = (out / "table1_comparison.html").read_text()
    assert "<td><b>0.600</b> ± 0.100 (paper 0.767, Δ −0.167)</td>" in html and html.count("<tr>") == 1 + 4
    cam_line = next(line for line in table1.splitlines() if line.startswith("| cam |"))
    assert "2/3 (incomplete)" in cam_line and "0.350 ± 0.071" in cam_line
    assert "| pathmamba-b | weak (image labels) | — | — | — | — | — |" in table1

    # Ablation: both rows of the configured variants, paper values from Table 2.
    assert "| f: B+MIML+CMB+DCL (Ours) (pathmamba) | weak (image labels) | 3 |" in (out / "table2_ablation.md").read_text()
    table2 = tables["table2"].set_index(["method", "metric"])
    assert list(dict.fromkeys(tables["table2"]["method"])) == ["pathmamba-b", "pathmamba"]
    assert table2.loc[("pathmamba-b", "mIoU"), "paper"] == 0.701

    per_class = tables["per_class"].set_index(["method", "class"])
    assert per_class.loc[("pathmamba", "NEC"), "IoU_mean"] == pytest.approx(0.7, abs=1e-12)
    sensitivity = tables["sensitivity"].set_index(["method", "metric"])
    assert sensitivity.loc[("pathmamba", "mIoU"), "mean"] == pytest.approx(0.3, abs=1e-12)
    assert "SENSITIVITY" in (out / "sensitivity_with_background.md").read_text()

    # Paired statistics: per image, pathmamba pools its seeds to (0.6 + 0.1 i), cam to 0.35.
    stats = tables["statistics"]
    assert list(stats["other"]) == ["cam", "trivial"]
    assert stats.iloc[1]["other_seeds"] == "none" and stats.iloc[1]["per_image_diff"] == pytest.approx(0.75 - 0.2)
    row = stats.iloc[0]
    assert row["n_images"] == 4 and row["per_image_n"] == 4
    assert row["per_image_diff"] == pytest.approx(0.6 + 0.15 - 0.35, abs=1e-12)
    assert row["per_image_ci_low"] <= row["per_image_diff"] <= row["per_image_ci_high"]
    assert row["split_diff"] == 0.0 and row["split_p"] == 1.0  # the same perfect matrices on both sides
    assert row["reference_seeds"] == "0,1,2" and row["other_seeds"] == "0,1"

    comparison = pd.read_csv(out / "comparison.csv")
    assert list(comparison.columns) == ["dataset", "method", "mDice_mean", "mDice_std", "mIoU_mean", "mIoU_std",
                                        "mPrecision_mean", "mPrecision_std", "mRecall_mean", "mRecall_std", "n_seeds"]


def tabular_columns(tex: str) -> tuple[int, list[int]]:
    """Columns declared by the tabular's spec, and the cells of each row."""
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", tex).group(1)
    declared = len(re.sub(r"[^lcr]", "", spec))
    rows = [line for line in tex.splitlines() if line.endswith("\\\\")]
    counts = []
    for line in rows:
        cells = re.split(r"(?<!\\)&", line)
        multi = sum(int(n) - 1 for n in re.findall(r"\\multicolumn\{(\d+)\}", line))
        counts.append(len(cells) + multi)
    return declared, counts


def test_latex_table_is_a_consistent_tabular(partial_run, tmp_path):
    experiment_dir, grid = partial_run
    grid = Grid(["luad-histoseg", "bcss-wsss"], grid.methods, grid.seeds)
    write_tables(experiment_dir, grid, PAPER, tmp_path, n_resamples=100)
    tex = (tmp_path / "table1_comparison.tex").read_text()
    declared, counts = tabular_columns(tex)
    assert declared == 2 + 5 * 2
    assert counts and all(count == declared for count in counts)
    assert "$\\mathbf{0.600} \\pm 0.100$ {\\scriptsize (0.767, $-0.167$)}" in tex
    assert "2/3" in tex and "--" in tex
    if shutil.which("pdflatex"):
        document = tmp_path / "doc.tex"
        document.write_text("\\documentclass{article}\\begin{document}\n" + tex + "\\end{document}\n")
        result = subprocess.run(["pdflatex", "-interaction=nonstopmode", document.name], check=False, cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout[-2000:]


def test_a_table_with_no_configured_method_is_written_empty_and_labelled(partial_run, tmp_path):
    experiment_dir, _ = partial_run
    write_tables(experiment_dir, Grid(["luad-histoseg"], ["cam"], [0, 1]), PAPER, tmp_path, n_resamples=100)
    assert "\\begin{tabular}" not in (tmp_path / "table2_ablation.tex").read_text()
    assert "None of this table's methods is configured." in (tmp_path / "table2_ablation.md").read_text()
    assert "No finished run of pathmamba to compare." in (tmp_path / "statistics.md").read_text()


def test_latex_table_of_an_unfinished_method_marks_missing_cells():
    table = results_table(pd.DataFrame(columns=["dataset", "method", "seed", *METRICS]), ["cam"],
                          ["synthetic-luad"], 2)
    tex = latex_results(table, "caption")
    assert "synthetic-luad" in tex and "--" in tex
    declared, counts = tabular_columns(tex)
    assert all(count == declared for count in counts)


def test_tables_command_reads_the_configfile(partial_run, tmp_path):
    experiment_dir, _ = partial_run
    config = tmp_path / "config.yaml"
    config.write_text(f"experiment: r\nresults_dir: {experiment_dir.parent}\nseeds: [0, 1, 2]\n"
                      "datasets: {luad-histoseg: {root: x}}\nmethods: {cam: {}, pathmamba: {}}\n"
                      "report: {reference_method: cam, n_resamples: 100}\n")
    assert main(["tables", "--configfile", str(config), "--out-dir", str(tmp_path / "t")]) == 0
    table = pd.read_csv(tmp_path / "t" / "table1_comparison.csv")
    assert list(dict.fromkeys(table["method"])) == ["cam", "pathmamba", "trivial"]
    statistics = (tmp_path / "t" / "statistics.md").read_text()
    assert "Paired statistics: cam against each other method" in statistics and "100 resamples" in statistics
    # the command line wins over the config
    assert main(["tables", "--configfile", str(config), "--out-dir", str(tmp_path / "t"),
                 "--reference-method", "pathmamba"]) == 0
    assert "Paired statistics: pathmamba against" in (tmp_path / "t" / "statistics.md").read_text()


def test_a_reference_method_that_is_not_registered_is_refused_before_anything_is_written(partial_run, tmp_path,
                                                                                          capsys):
    experiment_dir, grid = partial_run
    message = cli_error(["tables", "--experiment-dir", str(experiment_dir), "--datasets", *grid.datasets, "--methods", *grid.methods,
                         "--seeds", "0", "1", "2", "--reference-method", "path-mamba", "--out-dir",
                         str(tmp_path / "t")], capsys)
    assert "reference method 'path-mamba': not a registered method" in message and "pathmamba-noscan" in message
    assert not (tmp_path / "t").exists()


def test_a_new_methods_footnotes_rows_and_reference_come_from_its_registry_entry(partial_run, tmp_path,
                                                                                 monkeypatch):
    """Adding a method adds a registry entry, nothing in the tables: its footnote, its reference row, its Table 2
    row (by position) and Table 2 note follow from the entry, and it can be the statistics' reference."""
    experiment_dir, _ = partial_run
    monkeypatch.setitem(registry.METHODS, "my-variant", registry.MethodSpec(
        "pathmamba.models.pathmamba:PathMamba", note="my-variant trains on half the data.",
        reference="a control the paper lacks", ablation=registry.AblationRow(0, note="my-variant comes first.")))
    for seed in (0, 1, 2):
        write_run(experiment_dir, "luad-histoseg", "my-variant", seed, scores_of(0.4),
                  per_image={f"i{i}.png": 0.4 for i in range(4)})
    grid = Grid(["luad-histoseg"], ["pathmamba", "my-variant", "cam"], [0, 1, 2])
    tables = write_tables(experiment_dir, grid, PAPER, tmp_path / "t", n_resamples=20, reference_method="my-variant")
    table1, table2, statistics = ((tmp_path / "t" / name).read_text()
                                  for name in ("table1_comparison.md", "table2_ablation.md", "statistics.md"))
    assert "my-variant trains on half the data." in table1 and "my-variant trains on half the data." in table2
    assert "Reference rows beyond the paper, whose Table 1 does not report them: my-variant (a control" in table1
    assert list(dict.fromkeys(tables["table2"]["method"])) == ["my-variant", "pathmamba"]
    assert "my-variant comes first." in table2 and "my-variant comes first." not in table1
    assert "docs/baselines.md" in table1 and "docs/baselines.md" not in table2  # cam is a baseline, no variant is
    assert set(tables["statistics"]["reference"]) == {"my-variant"}
    assert set(tables["statistics"]["other"]) == {"pathmamba", "cam", "trivial"}
    assert "Paired statistics: my-variant against each other method" in statistics


@pytest.mark.parametrize(("name", "damage"), [("test_metrics.json", '{"dataset": "luad-his'),
                                               ("per_image.csv", "")])
def test_a_damaged_run_file_is_named_and_nothing_is_written(partial_run, tmp_path, capsys, name, damage):
    experiment_dir, _ = partial_run
    damaged = experiment_dir / "runs" / "luad-histoseg" / "cam" / "seed1" / name
    damaged.write_text(damage)
    out = tmp_path / "tables"
    message = cli_error(["tables", "--experiment-dir", str(experiment_dir), "--datasets", "luad-histoseg", "--methods", "cam",
                         "pathmamba", "--seeds", "0", "1", "2", "--paper", str(PAPER), "--n-resamples", "50",
                         "--out-dir", str(out)], capsys)
    assert str(damaged) in message and "run the" in message
    assert not out.exists() or not any(out.iterdir())


def test_splice_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold numbers\n<!-- results:end -->\noutro\n")
    table = tmp_path / "t.md"
    table.write_text("## Table 1\n\n### synthetic-luad\n\n| a |\n")
    splice_readme(readme, table)
    assert readme.read_text() == "intro\n<!-- results:start -->\n### synthetic-luad\n\n| a |\n<!-- results:end -->\noutro\n"
    splice_readme(readme, table)
    assert readme.read_text().count("synthetic-luad") == 1
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="expected one"):
        splice_readme(readme, table)


def test_readme_check_reports_stale_results_and_changes_nothing(tmp_path, capsys):
    from pathmamba.cli import main

    readme = tmp_path / "README.md"
    stale = "intro\n<!-- results:start -->\n| 0.650 |\n<!-- results:end -->\n"
    readme.write_text(stale)
    table = tmp_path / "t.md"
    table.write_text("## Table 1\n\n| 0.652 |\n")
    arguments = ["readme", "--table", str(table), "--readme", str(readme), "--check"]
    assert main(arguments) == 1
    out = capsys.readouterr().out
    assert "-| 0.650 |" in out and "+| 0.652 |" in out and "its results differ" in out
    assert readme.read_text() == stale
    assert main(arguments[:-1]) == 0
    assert main(arguments) == 0


def test_readme_check_names_unpinned_runs_whose_last_bits_may_differ(tmp_path, capsys):
    from pathmamba.cli import main

    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n| 0.650 |\n<!-- results:end -->\n")
    table = tmp_path / "demo" / "tables" / "t.md"
    table.parent.mkdir(parents=True)
    table.write_text("| 0.652 |\n")
    for seed, pinned in ((0, "avx2"), (1, None)):
        run = tmp_path / "demo" / "runs" / "synthetic-luad" / "cam" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"environment": {"cpu": {"pinned_isa": pinned}}}))
    assert main(["readme", "--table", str(table), "--readme", str(readme), "--check"]) == 1
    out = capsys.readouterr().out
    assert "1 runs of" in out and "not pinned to AVX2 (e.g. runs/synthetic-luad/cam/seed1)" in out
    assert f"pathmamba compare {tmp_path / 'demo'} {readme}" in out


def test_supervision_column_counts_pseudo_mask_training_as_weak():
    assert supervision_of("wsss-tissue") == supervision_of("cam") == "weak (image labels)"
    assert supervision_of("unet") == "full (pixel masks)"


def test_a_cell_whose_seeds_mixed_scans_or_precisions_is_marked_with_a_footnote(partial_run, tmp_path):
    experiment_dir, grid = partial_run
    ran = {0: ("fused", "bf16"), 1: ("fused", "bf16"), 2: ("pytorch", "fp32")}
    for seed, (scan, precision) in ran.items():
        folder = experiment_dir / "runs" / "luad-histoseg" / "pathmamba" / f"seed{seed}"
        (folder / "run.json").write_text(json.dumps({"environment": {"scan": scan, "precision": precision}}))
        record = json.loads((folder / "test_metrics.json").read_text())
        record["environment"] = {"scan": scan, "precision": precision}
        (folder / "test_metrics.json").write_text(json.dumps(record))
    for seed in (0, 1):
        folder = experiment_dir / "runs" / "luad-histoseg" / "cam" / f"seed{seed}"
        (folder / "run.json").write_text(json.dumps({"environment": {"scan": "pytorch", "precision": "fp32"}}))
    write_tables(experiment_dir, grid, PAPER, tmp_path / "tables", n_resamples=50)
    table1 = (tmp_path / "tables" / "table1_comparison.md").read_text()
    assert "| pathmamba † |" in table1 and "| cam |" in table1
    assert ("† luad-histoseg, pathmamba: its seeds ran with different selective scans or precisions "
            "(seed 0, 1: scan/precision fused/bf16; seed 2: scan/precision pytorch/fp32)") in table1
    assert "cam:" not in table1.split("†", 1)[1]


def write_evaluated_run(experiment_dir: Path, dataset: str, method: str, seed: int, truth, prediction) -> None:
    """An experiment folder written by evaluation's own meter from masks: test_metrics.json and per_image.csv
    agree as in a real run. truth, prediction: (N, H, W) integer tensors (truth 4 = background)."""
    from pathmamba.engine.metrics import SegmentationMeter

    meter = SegmentationMeter(4)
    meter.update(prediction, truth, [f"img{i}.png" for i in range(len(truth))])
    folder = experiment_dir / "runs" / dataset / method / f"seed{seed}"
    folder.mkdir(parents=True)
    record = {"method": method, "dataset": dataset, "seed": seed, "classes": list(get_dataset_spec(dataset).classes),
              "protocols": meter.summary()}
    (folder / "test_metrics.json").write_text(json.dumps(record))
    pd.DataFrame(meter.per_image()).to_csv(folder / "per_image.csv", index=False)


def test_split_level_statistics_give_table1s_difference_with_an_interval(tmp_path):
    """The statistics table's split-level Δ is Table 1's difference of means; the per-image view is not."""
    import torch

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (12, 16, 16), generator=generator)
    truth[:6, :12] = 4  # half the images mostly background: per-image and split means differ
    experiment_dir = tmp_path / "results" / "r"
    for seed in (0, 1, 2):
        for method, keep in (("pathmamba", 0.8), ("cam", 0.5)):
            noise = torch.randint(0, 4, truth.shape, generator=generator)
            right = torch.rand(truth.shape, generator=generator) < keep + 0.05 * seed
            write_evaluated_run(experiment_dir, "luad-histoseg", method, seed, truth, torch.where(right, truth % 4, noise))
    grid = Grid(["luad-histoseg"], ["cam", "pathmamba"], [0, 1, 2])
    tables = write_tables(experiment_dir, grid, PAPER, tmp_path / "tables", n_resamples=500)
    table1 = tables["table1"].set_index(["method", "metric"])["mean"]
    table1_diff = table1[("pathmamba", "mIoU")] - table1[("cam", "mIoU")]
    row = tables["statistics"].set_index("other").loc["cam"]
    assert row["split_diff"] == pytest.approx(table1_diff, abs=1e-12)
    assert row["split_ci_low"] < row["split_diff"] < row["split_ci_high"]
    assert row["split_p"] < 0.01 and row["n_images"] == 12
    assert abs(row["per_image_diff"] - table1_diff) > 1e-3
    text = (tmp_path / "tables" / "statistics.md").read_text()
    assert f"| luad-histoseg | pathmamba − cam | 12 | +{table1_diff:.3f} [" in text
    assert "Second view: per-image mIoU" in text


def test_per_image_files_without_confusion_matrices_are_refused_by_name(partial_run, tmp_path):
    experiment_dir, grid = partial_run
    old = experiment_dir / "runs" / "luad-histoseg" / "cam" / "seed0" / "per_image.csv"
    pd.read_csv(old).drop(columns=confusion_columns(4)).to_csv(old, index=False)
    with pytest.raises(ValueError, match=re.escape(str(old)) + ".*run it again"):
        write_tables(experiment_dir, grid, PAPER, tmp_path / "tables", n_resamples=10)


def test_paper_cells_that_no_evaluation_can_give_are_flagged_in_every_rendering(partial_run, tmp_path):
    """HistoSegNet on BCSS-WSSS: mIoU 0.276 < mDice / (2 - mDice) = 0.338 for mDice 0.505."""
    assert dice_iou_inconsistent(0.505, 0.276)
    assert not dice_iou_inconsistent(0.842, 0.767)
    assert dice_iou_inconsistent(0.5, 0.6)  # above mDice
    assert not dice_iou_inconsistent(0.5, 0.3333)  # on the bound, within rounding
    paper = load_paper_results(PAPER)
    flagged = [(table, dataset, method) for table in ("table1", "table2")
               for dataset, methods in paper[table].items() for method, values in methods.items()
               if dice_iou_inconsistent(values["mDice"], values["mIoU"])]
    assert flagged == [("table1", "bcss-wsss", "histosegnet")]

    experiment_dir, _ = partial_run
    write_run(experiment_dir, "bcss-wsss", "histosegnet", 0, scores_of(0.4))
    out = tmp_path / "tables"
    tables = write_tables(experiment_dir, Grid(["bcss-wsss"], ["histosegnet"], [0]), PAPER, out, n_resamples=10)
    cells = tables["table1"].set_index(["method", "metric"])["paper_inconsistent"]
    assert cells[("histosegnet", "mIoU")] and cells[("histosegnet", "mDice")]
    assert not cells[("histosegnet", "mPrecision")] and not cells[("trivial", "mIoU")]
    markdown = (out / "table1_comparison.md").read_text()
    assert f"(paper 0.276{INCONSISTENT_MARK}," in markdown and f"(paper 0.505{INCONSISTENT_MARK}," in markdown
    assert f"(paper 0.582{INCONSISTENT_MARK}" not in markdown
    assert f"- {INCONSISTENT_MARK} The paper's mDice and mIoU" in markdown
    html = (out / "table1_comparison.html").read_text()
    assert f"0.276{INCONSISTENT_MARK}" in html and "cannot both come from one evaluation" in html
    latex = (out / "table1_comparison.tex").read_text()
    assert "(0.276$^\\ddagger$," in latex and "{\\footnotesize $^\\ddagger$ The paper" in latex
    assert "≤" not in latex and "‡" not in latex


def test_table2_says_which_variants_start_from_imagenet_weights(partial_run, tmp_path):
    experiment_dir, _ = partial_run
    for method, pretrained in (("pathmamba-b", "none"), ("pathmamba-b-cmb", "none"),
                               ("pathmamba", "resources/weights/resnet50-imagenet.pth")):
        folder = write_run(experiment_dir, "luad-histoseg", method, 0, scores_of(0.5))
        (folder / "run.json").write_text(json.dumps({"hparams": {"pretrained": pretrained}}))
    grid = Grid(["luad-histoseg"], ["pathmamba-b", "pathmamba-b-cmb", "pathmamba"], [0])
    write_tables(experiment_dir, grid, PAPER, tmp_path / "paper", n_resamples=10)
    text = (tmp_path / "paper" / "table2_ablation.md").read_text()
    assert "ImageNet weights in pathmamba (resnet50-imagenet.pth), so the a → b and c → d steps" in text
    assert "runs its CMB network twice per image" in text
    (experiment_dir / "runs" / "luad-histoseg" / "pathmamba" / "seed0" / "run.json").write_text(
        json.dumps({"hparams": {"pretrained": "none"}}))
    write_tables(experiment_dir, grid, PAPER, tmp_path / "scratch", n_resamples=10)
    assert "every variant of this run started from random weights" in (tmp_path / "scratch" / "table2_ablation.md").read_text()


def test_table1_marks_reference_rows_and_points_to_the_baselines_document(partial_run, tmp_path):
    experiment_dir, grid = partial_run
    write_tables(experiment_dir, grid, PAPER, tmp_path / "tables", n_resamples=50)
    table1 = (tmp_path / "tables" / "table1_comparison.md").read_text()
    table2 = (tmp_path / "tables" / "table2_ablation.md").read_text()
    assert ("Reference rows beyond the paper, whose Table 1 does not report them: cam (the class activation maps "
            "every CAM-family method builds on).") in table1
    assert "docs/baselines.md" in table1
    assert "Reference rows" not in table2 and "docs/baselines.md" not in table2


def environment_of(device_name: str | None = None, cpu_model: str = "AMD EPYC 7B13", pinned: bool = True) -> dict:
    """The parts of an environment record that say what computed a result (pathmamba.core.environment)."""
    return {"device": "cuda:0" if device_name else "cpu", "device_name": device_name or "x86_64",
            "scan": "pytorch", "precision": "fp32", "host": "h",
            "cpu": {"model": cpu_model, "pins_requested": "avx2" if pinned else "native",
                    "capability": "AVX2" if pinned else "AVX512", "pinned_isa": "avx2" if pinned else None}}


def record_environment(experiment_dir: Path, method: str, seed: int, environment: dict) -> None:
    """``environment`` into a run's run.json and test_metrics.json, as its training and evaluation wrote it."""
    folder = experiment_dir / "runs" / "luad-histoseg" / method / f"seed{seed}"
    (folder / "run.json").write_text(json.dumps({"environment": environment}))
    record = json.loads((folder / "test_metrics.json").read_text())
    (folder / "test_metrics.json").write_text(json.dumps({**record, "environment": environment}))


def test_tables_combine_experiment_folders_of_several_machines(partial_run, tmp_path, capsys):
    """A grid split across machines: each folder holds some seeds; a run in both must be the same run."""
    experiment_dir, grid = partial_run
    workstation, cluster = tmp_path / "results" / "workstation", tmp_path / "results" / "cluster"
    for seed in (0, 1, 2):
        target = workstation if seed < 2 else cluster
        shutil.copytree(experiment_dir / "runs" / "luad-histoseg" / "pathmamba" / f"seed{seed}",
                        target / "runs" / "luad-histoseg" / "pathmamba" / f"seed{seed}")
    shutil.copytree(experiment_dir / "runs" / "luad-histoseg" / "cam", workstation / "runs" / "luad-histoseg" / "cam")
    for folder in (workstation, cluster):  # identical copies of one run: accepted
        shutil.copytree(experiment_dir / "runs" / "luad-histoseg" / "trivial", folder / "runs" / "luad-histoseg" / "trivial")
    shutil.copytree(experiment_dir / "runs" / "luad-histoseg" / "cam" / "seed0", cluster / "runs" / "luad-histoseg" / "cam" / "seed0")
    arguments = ["tables", "--experiment-dir", str(workstation), str(cluster), "--datasets", "luad-histoseg", "--methods",
                 "cam", "pathmamba-b", "pathmamba", "--seeds", "0", "1", "2", "--paper", str(PAPER),
                 "--n-resamples", "50"]
    assert main([*arguments, "--out-dir", str(tmp_path / "combined")]) == 0
    write_tables(experiment_dir, grid, PAPER, tmp_path / "one", n_resamples=50)
    for name in ("table1_comparison.md", "table1_comparison.csv", "statistics.csv", "per_class_iou.csv"):
        assert (tmp_path / "combined" / name).read_text() == (tmp_path / "one" / name).read_text(), name

    copy = cluster / "runs" / "luad-histoseg" / "cam" / "seed0" / "test_metrics.json"
    record = json.loads(copy.read_text())
    record["protocols"]["ignore_background"]["mIoU"] = 0.31
    copy.write_text(json.dumps(record))
    message = cli_error([*arguments, "--out-dir", str(tmp_path / "refused")], capsys)
    assert message == (f"pathmamba tables: runs/luad-histoseg/cam/seed0 is in {workstation} and in {cluster} with "
                       "different results: ignore_background.mIoU 0.3 vs 0.31; a run of one dataset, method and seed "
                       "must have one result: remove the copy that should not count")
    assert not (tmp_path / "refused").exists()
    repeated = [*arguments[:3], str(workstation), *arguments[4:], "--out-dir", "t"]
    assert cli_error(repeated, capsys) == (f"pathmamba tables: --experiment-dir: {workstation} given more than once; each "
                                           "must be unique")


@pytest.mark.parametrize(("environments", "note"), [
    ({0: environment_of("NVIDIA A100-SXM4-80GB"), 1: environment_of("NVIDIA H100 80GB HBM3"),
      2: environment_of("NVIDIA H100 80GB HBM3")},
     "(seed 0: GPU NVIDIA A100-SXM4-80GB, CPU pinned to AVX2; seed 1, 2: GPU NVIDIA H100 80GB HBM3, CPU pinned to AVX2)"),
    ({0: environment_of(), 1: environment_of(), 2: environment_of(pinned=False)},
     "(seed 0, 1: CPU pinned to AVX2; seed 2: CPU AMD EPYC 7B13 unpinned)"),
    ({0: environment_of(), 1: environment_of(cpu_model="Intel Xeon Platinum 8480+"), 2: environment_of()}, None),
])
def test_a_cell_whose_seeds_ran_on_different_gpus_or_cpu_pins_is_marked(partial_run, tmp_path, environments, note):
    """Pinned CPUs give the same numbers on any x86-64 CPU: their models do not mark a cell."""
    experiment_dir, grid = partial_run
    for seed, environment in environments.items():
        record_environment(experiment_dir, "pathmamba", seed, environment)
    write_tables(experiment_dir, grid, PAPER, tmp_path / "tables", n_resamples=20)
    table1 = (tmp_path / "tables" / "table1_comparison.md").read_text()
    if note is None:
        assert "†" not in table1
    else:
        assert "| pathmamba † |" in table1
        assert (f"- † luad-histoseg, pathmamba: its seeds ran on different hardware (GPU model, CPU or its pins) "
                f"{note}; the spread includes that difference.") in table1


def test_a_cell_whose_seeds_mixed_hardware_and_precisions_names_both(partial_run, tmp_path):
    experiment_dir, grid = partial_run
    record_environment(experiment_dir, "pathmamba", 0, environment_of("NVIDIA H100 80GB HBM3") | {"precision": "bf16"})
    for seed in (1, 2):
        record_environment(experiment_dir, "pathmamba", seed, environment_of())
    write_tables(experiment_dir, grid, PAPER, tmp_path / "tables", n_resamples=20)
    assert ("its seeds ran on different hardware (GPU model, CPU or its pins) and with different selective scans or "
            "precisions (seed 0: GPU NVIDIA H100 80GB HBM3, CPU pinned to AVX2, scan/precision pytorch/bf16; seed 1, 2: "
            "CPU pinned to AVX2, scan/precision pytorch/fp32)") in (tmp_path / "tables" / "table1_comparison.md").read_text()
