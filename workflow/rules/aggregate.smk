# Tables, statistics and figures of a run; `snakemake --report results/<run>/report.html` gathers them.
# The CLI commands behind these rules also run by hand on a partial grid (whatever finished):
#   python -m pathmamba tables --configfile <config> --out-dir results/<run>/tables

from types import SimpleNamespace


report: "../report/workflow.rst"


PAPER_RESULTS = f"{REPO}/config/paper_results.yaml"
REPORT_SETTINGS = config["report"]
TABLES = f"{RESULTS}/{layout.TABLES}"
FIGURES = f"{RESULTS}/{layout.FIGURES}"


rule tables:
    input:
        trivial=expand(f"{TRIVIAL_RUN_DIR}/test_metrics.json", dataset=DATASETS),
        runs=run_files("test_metrics.json"),
        per_image=run_files("per_image.csv"),
        paper=PAPER_RESULTS,
    output:
        table1_csv=f"{TABLES}/table1_comparison.csv",
        table1_html=report(
            f"{TABLES}/table1_comparison.html",
            caption="../report/table1.rst",
            category="Tables",
            labels={"table": "Table 1: comparison"},
        ),
        table1_md=f"{TABLES}/table1_comparison.md",
        table1_tex=f"{TABLES}/table1_comparison.tex",
        table2_csv=f"{TABLES}/table2_ablation.csv",
        table2_html=report(
            f"{TABLES}/table2_ablation.html",
            caption="../report/table2.rst",
            category="Tables",
            labels={"table": "Table 2: ablation"},
        ),
        table2_md=f"{TABLES}/table2_ablation.md",
        table2_tex=f"{TABLES}/table2_ablation.tex",
        per_class_csv=f"{TABLES}/per_class_iou.csv",
        per_class_html=report(
            f"{TABLES}/per_class_iou.html",
            caption="../report/per_class.rst",
            category="Tables",
            labels={"table": "Per-class IoU"},
        ),
        per_class_md=f"{TABLES}/per_class_iou.md",
        sensitivity_csv=f"{TABLES}/sensitivity_with_background.csv",
        sensitivity_html=report(
            f"{TABLES}/sensitivity_with_background.html",
            caption="../report/sensitivity.rst",
            category="Tables",
            labels={"table": "Sensitivity: 5-class protocol"},
        ),
        sensitivity_md=f"{TABLES}/sensitivity_with_background.md",
        statistics_csv=f"{TABLES}/statistics.csv",
        statistics_html=report(
            f"{TABLES}/statistics.html",
            caption="../report/statistics.rst",
            category="Tables",
            labels={"table": "Paired statistics"},
        ),
        statistics_md=f"{TABLES}/statistics.md",
        csv=f"{TABLES}/comparison.csv",
        md=f"{TABLES}/comparison.md",
    log:
        f"{RESULTS}/{layout.REPORT_LOGS}/tables.log",
    conda:
        "../envs/pathmamba.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        run_dir=lambda wildcards, input: str(layout.run_dir_of(input.runs[0])),
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
        datasets=DATASETS,
        methods=METHODS,
        seeds=SEEDS,
        n_resamples=REPORT_SETTINGS["n_resamples"],
        bootstrap_seed=REPORT_SETTINGS["bootstrap_seed"],
    shell:
        "python -m pathmamba tables --run-dir {params.run_dir:q} --datasets {params.datasets:q}"
        " --methods {params.methods:q} --seeds {params.seeds:q} --paper {input.paper:q}"
        " --n-resamples {params.n_resamples:q} --bootstrap-seed {params.bootstrap_seed:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule figures:
    input:
        histories=run_files("history.csv"),
        # The compute-cost figure reads them; two-stage methods have two more jobs.
        benchmarks=run_files("train.tsv", BENCHMARK_DIR),
        first_stage_benchmarks=expand(
            f"{BENCHMARK_DIR}/{{name}}",
            dataset=DATASETS,
            method=TWO_STAGE_METHODS,
            seed=SEEDS,
            name=["train_stage1.tsv", "pseudo_masks.tsv"],
        ),
        runs=run_files("test_metrics.json"),
        # The confusion matrices sum their per-image cells; the trivial reference is drawn too.
        per_image=run_files("per_image.csv"),
        trivial=expand(f"{TRIVIAL_RUN_DIR}/test_metrics.json", dataset=DATASETS),
        masks=run_files("masks"),
        # The heat maps run the lowest seed's models on the CPU for the few images shown.
        models=expand(f"{RUN_DIR}/model.pt", dataset=DATASETS, method=METHODS, seed=min(SEEDS)),
        data=[dataset_root(SimpleNamespace(dataset=dataset)) for dataset in DATASETS],
        paper=PAPER_RESULTS,
    output:
        *[
            report(
                f"{FIGURES}/qualitative_{dataset}.png",
                caption="../report/qualitative.rst",
                category="Figures",
                labels={"figure": f"Qualitative: {dataset}"},
            )
            for dataset in DATASETS
        ],
        *[
            report(
                f"{FIGURES}/heatmaps_{dataset}.png",
                caption="../report/heatmaps.rst",
                category="Figures",
                labels={"figure": f"Heat maps: {dataset}"},
            )
            for dataset in DATASETS
        ],
        *[
            report(
                f"{FIGURES}/confusion_{dataset}.png",
                caption="../report/confusion.rst",
                category="Figures",
                labels={"figure": f"Confusion matrices: {dataset}"},
            )
            for dataset in DATASETS
        ],
        report(
            f"{FIGURES}/miou_over_seeds.png",
            caption="../report/seed_spread.rst",
            category="Figures",
            labels={"figure": "mIoU over seeds"},
        ),
        report(
            f"{FIGURES}/ablation.png",
            caption="../report/ablation.rst",
            category="Figures",
            labels={"figure": "Ablation (Table 2)"},
        ),
        report(
            f"{FIGURES}/per_class_iou.png",
            caption="../report/per_class_chart.rst",
            category="Figures",
            labels={"figure": "Per-class IoU"},
        ),
        report(
            f"{FIGURES}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
            labels={"figure": "Training curves"},
        ),
        report(
            f"{FIGURES}/compute_cost.png",
            caption="../report/compute_cost.rst",
            category="Figures",
            labels={"figure": "Compute cost"},
        ),
        expand(
            f"{FIGURES}/{{name}}.pdf",
            name=[
                *[f"qualitative_{d}" for d in DATASETS],
                *[f"heatmaps_{d}" for d in DATASETS],
                *[f"confusion_{d}" for d in DATASETS],
                "miou_over_seeds",
                "ablation",
                "per_class_iou",
                "training_curves",
                "compute_cost",
            ],
        ),
    log:
        f"{RESULTS}/{layout.REPORT_LOGS}/figures.log",
    conda:
        "../envs/pathmamba.yaml"
    resources:
        # with the heat maps' models of every CAM-family method and PathMamba loaded at once
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        run_dir=lambda wildcards, input: str(layout.run_dir_of(input.runs[0])),
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
        datasets=DATASETS,
        methods=METHODS,
        seeds=SEEDS,
        data_roots=[f"{d}={dataset_root(SimpleNamespace(dataset=d))}" for d in DATASETS],
        n_images=max(1, min(REPORT_SETTINGS["n_images"], config["evaluate"]["n_masks"])),
    shell:
        "python -m pathmamba figures --run-dir {params.run_dir:q} --datasets {params.datasets:q}"
        " --methods {params.methods:q} --seeds {params.seeds:q} --paper {input.paper:q}"
        " --data-root {params.data_roots:q} --n-images {params.n_images:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
