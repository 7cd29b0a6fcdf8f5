"""GPU planning: job counts and GPU-hours of a config's grid (pathmamba/operations/plan.py, `pathmamba plan`)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_error

from pathmamba.cli import main
from pathmamba.engine.config import ConfigError
from pathmamba.engine.registry import two_stage_methods
from pathmamba.operations.plan import (
    JOB_OVERHEAD_HOURS,
    evaluate_gpu_hours,
    floor_throughput,
    format_floor,
    format_plan,
    gpu_jobs,
    method_throughput,
    runtime_minutes,
    seconds_per_image,
    train_gpu_hours,
)

CONFIG = {
    "experiment": "plan",
    "seeds": [0, 1, 2],
    "datasets": {
        "synthetic-luad": {"synthetic": {"n_train": 100, "n_val": 20, "n_test": 50, "size": 32, "seed": 0}},
        "luad-histoseg": {"root": "unused/by/the/plan"},
    },
    "train": {"epochs": 3},
    "methods": {"cam": {}, "pathmamba": {"train": {"epochs": 6}}},
    "throughput": {
        "default": {"train_images_per_s": 10, "eval_images_per_s": 20},
        "pathmamba": {"train_images_per_s": 5},
    },
}


@pytest.fixture(autouse=True)
def empty_working_directory(tmp_path, monkeypatch):
    """Relative paths (resources/throughput-<device type>.json) resolve in an empty folder: no measured
    file of the checkout changes these estimates."""
    monkeypatch.chdir(tmp_path)


def test_hours_follow_image_counts_epochs_and_throughput():
    # 3 epochs x (100 images / 10 per s + 20 val images / 20 per s) = 33 s
    assert train_gpu_hours(CONFIG, "synthetic-luad", "cam") == pytest.approx(33 / 3600 + JOB_OVERHEAD_HOURS)
    # the method's own epochs and train throughput, the default eval throughput: 6 x (100/5 + 20/20)
    assert train_gpu_hours(CONFIG, "synthetic-luad", "pathmamba") == pytest.approx(126 / 3600 + JOB_OVERHEAD_HOURS)
    # a real dataset's published counts: 16,678 train, 300 val, 307 test images
    assert train_gpu_hours(CONFIG, "luad-histoseg", "cam") == pytest.approx(
        3 * (16678 / 10 + 300 / 20) / 3600 + JOB_OVERHEAD_HOURS)
    assert evaluate_gpu_hours(CONFIG, "luad-histoseg", "cam") == pytest.approx(307 / 20 / 3600 + JOB_OVERHEAD_HOURS)


def test_grid_has_a_train_and_an_evaluate_job_per_dataset_method_seed():
    jobs = gpu_jobs(CONFIG)
    assert len(jobs) == 2 * 2 * 3 * 2
    assert {(job.rule, job.dataset, job.method, job.seed) for job in jobs} == {
        (rule, dataset, method, seed) for rule in ("train", "evaluate") for dataset in CONFIG["datasets"]
        for method in CONFIG["methods"] for seed in CONFIG["seeds"]}


def test_runtime_limit_has_a_margin_and_grows_with_attempts_up_to_the_maximum():
    assert runtime_minutes(1.0, attempt=1, max_hours=24) == 90
    assert runtime_minutes(1.0, attempt=3, max_hours=24) == 270
    assert runtime_minutes(10.0, attempt=2, max_hours=24) == 24 * 60  # 30 h asked, cut to the maximum
    assert runtime_minutes(1.0, attempt=3, max_hours=2.5) == 150


def test_missing_throughput_names_the_key():
    config = {**CONFIG, "throughput": {"pathmamba": {"train_images_per_s": 5}}}
    with pytest.raises(ConfigError, match=r"throughput\.cam: missing train_images_per_s, eval_images_per_s"):
        gpu_jobs(config)


def test_cli_prints_the_plan_of_a_config_file(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    assert main(["plan", "--configfile", str(path)]) == 0
    out = capsys.readouterr().out
    total = sum(job.gpu_hours for job in gpu_jobs(CONFIG))
    assert f"24 GPU jobs (12 train, 12 evaluate), {total:.1f} GPU-hours estimated" in out
    assert "| luad-histoseg | pathmamba | 6 |" in out


def test_cli_fills_schema_defaults_and_rejects_bad_values(tmp_path, capsys):
    # Without a throughput block the schema's default applies, as in the workflow.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in CONFIG.items() if key != "throughput"}))
    assert main(["plan", "--configfile", str(path)]) == 0
    assert "24 GPU jobs" in capsys.readouterr().out
    path.write_text(yaml.safe_dump({**CONFIG, "throughput": {"cam": {"train_images_per_s": 0}}}))
    assert "train_images_per_s" in cli_error(["plan", "--configfile", str(path)], capsys)


def test_two_stage_method_plans_its_first_stage_and_pseudo_masks_too():
    config = {**CONFIG, "methods": {"wsss-tissue": {"stage1": {"train": {"epochs": 2}}, "train": {"epochs": 4}}}}
    jobs = [job for job in gpu_jobs(config) if job.dataset == "synthetic-luad" and job.seed == 0]
    hours = {job.rule: job.gpu_hours for job in jobs}
    assert list(hours) == ["train_stage1", "pseudo_masks", "train", "evaluate"]
    # each stage its own epochs: 2 x (100/10 + 20/20) and 4 x (100/10 + 20/20) s; masks of 100 images at 20/s
    assert hours["train_stage1"] == pytest.approx(22 / 3600 + JOB_OVERHEAD_HOURS)
    assert hours["train"] == pytest.approx(44 / 3600 + JOB_OVERHEAD_HOURS)
    assert hours["pseudo_masks"] == pytest.approx(5 / 3600 + JOB_OVERHEAD_HOURS)


def test_paper_config_plans_every_configured_job():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    jobs = gpu_jobs(config)
    # train and evaluate per (dataset, method, seed); wsss-tissue's first stage and pseudo masks besides
    assert len(jobs) == (2 * len(config["methods"]) + 2) * len(config["datasets"]) * len(config["seeds"])
    assert all(job.gpu_hours > JOB_OVERHEAD_HOURS for job in jobs)



def test_readme_gpu_hours_are_the_plan_of_the_paper_config():
    """The README's GPU-hours table (rows may group methods of equal cost) is what `plan` gives now."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    hours: dict[tuple[str, str], float] = {}
    for job in gpu_jobs(config):
        hours[job.dataset, job.method] = hours.get((job.dataset, job.method), 0.0) + job.gpu_hours
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| method | GPU-hours, LUAD-HistoSeg | GPU-hours, BCSS-WSSS |"):]
    rows = table[:table.index("\n\n")].splitlines()[2:]
    listed = set()
    for row in rows:
        names, luad, bcss = (cell.strip() for cell in row.strip("|").split("|"))
        for method in re.sub(r"\(.*?\)", "", names).replace(",", " ").split():
            listed.add(method)
            assert (float(luad), float(bcss)) == (round(hours["luad-histoseg", method], 1),
                                                  round(hours["bcss-wsss", method], 1)), row
    assert listed == set(config["methods"]), rows
    total = sum(hours.values())
    assert f"about {total:.0f} GPU-hours" in readme


def measured_entry(train: float, evaluate: float, batch_size: int = 16, hparams: dict | None = None) -> dict:
    return {"train_images_per_s": train, "eval_images_per_s": evaluate, "peak_memory_mb": 100.0, "steps": 2,
            "batch_size": batch_size, "hparams": hparams or {}}


def write_throughput_file(path: Path, device_type: str, methods: dict, image_size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device_type": device_type, "device_name": "Test CPU", "torch": "2.0",
                                "date": "2026-01-02T03:04:05+00:00", "settings": {"image_size": image_size},
                                "methods": methods}))
    return path


CPU_CONFIG = {**CONFIG, "train": {"epochs": 3, "device": "cpu"}}


def test_measured_throughput_is_used_per_method_where_it_applies():
    write_throughput_file(Path("resources/throughput-cpu.json"), "cpu", {"cam": measured_entry(100, 200)})
    # 3 epochs x (100 images / 100 per s + 20 val images / 200 per s), measured at the synthetic 32 px
    assert train_gpu_hours(CPU_CONFIG, "synthetic-luad", "cam") == pytest.approx(3.3 / 3600 + JOB_OVERHEAD_HOURS)
    assert method_throughput(CPU_CONFIG, "synthetic-luad", "cam").source == "measured (Test CPU, 2026-01-02)"
    # the 224 px real dataset was not measured; pathmamba not at all: the config's numbers for both
    assert method_throughput(CPU_CONFIG, "luad-histoseg", "cam").source == "assumed (config; measured at other settings)"
    assert train_gpu_hours(CPU_CONFIG, "luad-histoseg", "cam") == pytest.approx(
        3 * (16678 / 10 + 300 / 20) / 3600 + JOB_OVERHEAD_HOURS)
    assert method_throughput(CPU_CONFIG, "synthetic-luad", "pathmamba").source == "assumed (config; not measured)"
    rows = {tuple(line.split(" | ")[:2]): line for line in format_plan(gpu_jobs(CPU_CONFIG)).splitlines()}
    assert rows["| synthetic-luad", "cam"].endswith("| measured (Test CPU, 2026-01-02) |")
    assert rows["| synthetic-luad", "pathmamba"].endswith("| assumed (config; not measured) |")


def test_measurement_at_another_batch_size_or_hparams_does_not_apply():
    config = {**CPU_CONFIG, "methods": {"cam": {"hparams": {"backbone": "resnet18", "pretrained": "a.pth"}}}}
    path = Path("resources/throughput-cpu.json")
    write_throughput_file(path, "cpu", {"cam": measured_entry(100, 200, hparams={"backbone": "resnet18"})})
    # the weights file does not change the speed, so a measurement with other (or no) weights applies
    assert method_throughput(config, "synthetic-luad", "cam").source.startswith("measured")
    write_throughput_file(path, "cpu", {"cam": measured_entry(100, 200, batch_size=8, hparams={"backbone": "resnet18"})})
    assert method_throughput(config, "synthetic-luad", "cam").source == "assumed (config; measured at other settings)"
    write_throughput_file(path, "cpu", {"cam": measured_entry(100, 200, hparams={"backbone": "resnet50"})})
    assert method_throughput(config, "synthetic-luad", "cam").source == "assumed (config; measured at other settings)"


def test_a_cuda_config_ignores_a_cpu_measurement():
    cpu_file = write_throughput_file(Path("resources/throughput-cpu.json"), "cpu", {"cam": measured_entry(100, 200)})
    assumed = train_gpu_hours(CONFIG, "synthetic-luad", "cam")
    assert assumed == pytest.approx(33 / 3600 + JOB_OVERHEAD_HOURS)  # train.device auto: plans for CUDA
    assert method_throughput(CONFIG, "synthetic-luad", "cam").source == "assumed (config)"
    named = {**CONFIG, "train": {"epochs": 3, "device": "cuda"}, "throughput_file": str(cpu_file)}
    assert train_gpu_hours(named, "synthetic-luad", "cam") == assumed
    assert method_throughput(named, "synthetic-luad", "cam").source == (
        f"assumed (config; {cpu_file} was measured on cpu)")


def test_pixel_supervised_hours_follow_the_val_split_not_the_training_split():
    config = {**CONFIG, "methods": {"unet": {}, "cam": {}}}
    bigger = {**config, "datasets": {"synthetic-luad": {"synthetic": {"n_train": 200, "n_val": 20, "n_test": 50,
                                                                      "size": 32, "seed": 0}}}}
    # fits 16 of the 20 val images, selects on 4: 3 epochs x (16 / 10 + 4 / 20) s, whatever n_train is
    assert train_gpu_hours(config, "synthetic-luad", "unet") == pytest.approx(5.4 / 3600 + JOB_OVERHEAD_HOURS)
    assert train_gpu_hours(bigger, "synthetic-luad", "unet") == train_gpu_hours(config, "synthetic-luad", "unet")
    assert train_gpu_hours(bigger, "synthetic-luad", "cam") > train_gpu_hours(config, "synthetic-luad", "cam")


def test_an_invalid_throughput_file_is_an_error_naming_it(tmp_path, capsys):
    path = Path("resources/throughput-cpu.json")
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"resources/throughput-cpu\.json: unreadable throughput file"):
        gpu_jobs(CPU_CONFIG)
    write_throughput_file(path, "cpu", {"cam": measured_entry(100, -1)})
    with pytest.raises(ConfigError, match=r"throughput-cpu\.json: .*methods\.cam\.eval_images_per_s is -1"):
        gpu_jobs(CPU_CONFIG)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(CPU_CONFIG))
    message = cli_error(["plan", "--configfile", str(config_path)], capsys)
    assert re.search(r"throughput-cpu\.json: .*expected a positive number", message)


def test_plan_does_not_import_torch():
    # The Snakefile imports the plan at start-up, which must stay fast.
    code = "import sys, pathmamba.operations.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --- the floor: counted work per image, GPU peaks, derived throughput (pathmamba/operations/plan.py, costs.py) ---

GPU = {"bf16_tflops": 100, "fp32_tflops": 10, "hbm_gb_s": 1000, "exp_tera_per_s": 1, "source": "test sheet"}
WORK = {"flops": 2e9, "bytes": 1e9, "scan_exps": 0, "scan_flops": 0, "scan_bytes": 0}
# cam's image: 2 GFLOPs at 100 TFLOP/s = 20 us, 1 GB at 1000 GB/s = 1 ms: memory-bound, 1 ms per image
# (training adds Adam's 28 bytes x 2,000,000 parameters / batch 16 = 3.5 MB: 1.0035 ms).
COSTS = {"methods": {"cam": {"parameters": 2_000_000, "image_size": 32, "hparams": {},
                             "train": WORK, "eval": {**WORK, "bytes": 0.5e9}}}}


def floor_config(costs_file: Path, **throughput) -> dict:
    return {**CONFIG, "methods": {"cam": {}}, "throughput": {"default": {"train_images_per_s": 10,
                                                                         "eval_images_per_s": 20}, **throughput},
            "floor": {"gpu": "test-gpu", "efficiency": {"cnn": 0.5, "mamba": 0.25}, "costs_file": str(costs_file),
                      "gpus": {"test-gpu": GPU}}}


def test_estimate_is_the_counted_floor_divided_by_the_family_efficiency(tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(COSTS))
    config = floor_config(costs)
    floor = floor_throughput(config, "synthetic-luad", "cam")
    assert floor.train_images_per_s == pytest.approx(1 / 1.0035e-3)
    assert floor.eval_images_per_s == pytest.approx(1 / 0.5e-3)
    speed = method_throughput(config, "synthetic-luad", "cam")
    assert speed.train_images_per_s == pytest.approx(0.5 / 1.0035e-3)
    assert speed.eval_images_per_s == pytest.approx(0.5 / 0.5e-3)
    assert speed.source == "derived (test-gpu floor x 0.5)"
    # Counted at another image size (luad-histoseg is 224 px): not derived, the default entry instead.
    assert method_throughput(config, "luad-histoseg", "cam").source == "assumed (config)"
    # The SLURM time limits follow: 3 epochs x (100 / train + 20 / eval images per second).
    assert train_gpu_hours(config, "synthetic-luad", "cam") == pytest.approx(
        3 * (100 / speed.train_images_per_s + 20 / speed.eval_images_per_s) / 3600 + JOB_OVERHEAD_HOURS)


def test_the_scan_adds_its_own_kernel_time():
    scan = {**WORK, "scan_exps": 3e9, "scan_flops": 1e9, "scan_bytes": 0.0}
    # exps at 1 T/s: 3 ms, more than its FLOPs at 10 TFLOP/s (0.1 ms) or its bytes
    assert seconds_per_image(scan, GPU) == pytest.approx(1e-3 + 3e-3)
    assert seconds_per_image(WORK, GPU, extra_bytes=1e9) == pytest.approx(2e-3)


def test_a_throughput_above_the_floor_is_refused_naming_the_key(tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(COSTS))
    config = floor_config(costs, cam={"train_images_per_s": 5000, "eval_images_per_s": 100})
    with pytest.raises(ConfigError, match=r"throughput\.cam\.train_images_per_s: 5000 images per second is above "
                                          r"cam's floor on test-gpu \(997 at the GPU's peaks"):
        gpu_jobs(config)
    # at or below the floor: used as configured
    config = floor_config(costs, cam={"train_images_per_s": 900, "eval_images_per_s": 100})
    assert method_throughput(config, "synthetic-luad", "cam").source == "assumed (config)"


def test_counts_of_other_hyper_parameters_do_not_apply(tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"methods": {"cam": {**COSTS["methods"]["cam"], "hparams": {"backbone": "resnet18"}}}}))
    config = floor_config(costs)
    assert floor_throughput(config, "synthetic-luad", "cam") is None
    assert "| synthetic-luad | cam | cnn | not counted |" in format_floor(config)
    costs.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"costs\.json \(floor\.costs_file\): not a costs file"):
        gpu_jobs(config)


def test_floor_table_has_the_images_and_hours_of_every_job(tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(COSTS))
    config = {**floor_config(costs), "datasets": {"synthetic-luad": CONFIG["datasets"]["synthetic-luad"]}}
    table = format_floor(config)
    # per seed 3 epochs x 100 images trained; 3 x 20 selection + 50 test images predicted; 3 seeds
    floor_hours = 3 * (300 * 1.0035e-3 + 110 * 0.5e-3) / 3600
    estimate = sum(job.gpu_hours for job in gpu_jobs(config))
    row = next(line for line in table.splitlines() if line.startswith("| synthetic-luad | cam |"))
    assert row.split(" | ")[8:] == ["300 / 110", f"{floor_hours:.1f}", f"{estimate:.1f}",
                                    f"{estimate / floor_hours:.1f} |"]
    assert "Floor on test-gpu: 100 TFLOP/s bf16 (tensor), 10 TFLOP/s fp32, 1000 GB/s" in table


def test_paper_config_derives_every_estimate_from_its_committed_counts():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())  # its costs_file: in the repository
    for dataset in config["datasets"]:
        for method in config["methods"]:
            stages = ([1] if method in two_stage_methods() else []) + [None]
            for stage in stages:
                speed = method_throughput(config, dataset, method, stage)
                floor = floor_throughput(config, dataset, method, stage)
                assert speed.source.startswith("derived (a100-sxm4-80gb floor x "), (method, stage, speed.source)
                assert speed.train_images_per_s <= floor.train_images_per_s
                assert speed.eval_images_per_s <= floor.eval_images_per_s


def test_an_efficiency_above_one_is_refused(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    config = floor_config(tmp_path / "costs.json")
    config["floor"]["efficiency"]["cnn"] = 1.5
    path.write_text(yaml.safe_dump(config))
    assert "1.5 is greater than the maximum of 1" in cli_error(["plan", "--configfile", str(path)], capsys)


def test_plan_floor_counts_each_method_once_and_prints_the_table(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    config = floor_config(costs)
    config.update(datasets={"synthetic-luad": CONFIG["datasets"]["synthetic-luad"]}, seeds=[0],
                  methods={"cam": {"hparams": {"backbone": "resnet18", "output_stride": 32}}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["plan", "--configfile", str(path), "--floor"]) == 0
    record = json.loads(costs.read_text())
    cam = record["methods"]["cam"]
    assert cam["image_size"] == 32 and cam["hparams"] == {"backbone": "resnet18", "output_stride": 32}
    # ResNet-18: 1.82 G multiply-adds per 224 px image (2 FLOPs each), x (32 / 224)^2: 0.074 GFLOPs
    assert 0.07e9 < cam["eval"]["flops"] < 0.08e9 and 2 * cam["eval"]["flops"] < cam["train"]["flops"]
    assert cam["train"]["bytes"] > cam["eval"]["bytes"] > 0 and cam["train"]["scan_exps"] == 0
    assert "| synthetic-luad | cam | cnn |" in capsys.readouterr().out
    before = costs.stat().st_mtime_ns
    assert main(["plan", "--configfile", str(path), "--floor"]) == 0
    assert costs.stat().st_mtime_ns == before  # counted already: not again
