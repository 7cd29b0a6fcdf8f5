# Tables, statistics and figures of a run; `snakemake --report results/<experiment>/report.html` gathers them.
# The CLI commands behind these rules also run by hand on a partial grid (whatever finished):
#   python -m pathmamba tables --configfile <config> --out-dir results/<experiment>/tables

from types import SimpleNamespace


report: "../report/workflow.rst"


PAPER_RESULTS = f"{REPO}/config/paper_results.yaml"
REPORT_SETTINGS = config["report"]
REPORT_LOG_DIR = f"{RESULTS}/{layout.REPORT_LOGS}"


rule tables:
    input:
        trivial=expand(f"{TRIVIAL_EXPERIMENT_DIR}/{layout.TEST_METRICS}", dataset=DATASETS),
        runs=run_files(layout.TEST_METRICS),
        per_image=run_files(layout.PER_IMAGE),
        paper=PAPER_RESULTS,
    output:
        table1_csv=table(layout.TABLE1, "csv"),
        table1_html=report(
            table(layout.TABLE1, "html"),
            caption="../report/table1.rst",
            category="Tables",
            labels={"table": "Table 1: comparison"},
        ),
        table1_md=table(layout.TABLE1, "md"),
        table1_tex=table(layout.TABLE1, "tex"),
        table2_csv=table(layout.TABLE2, "csv"),
        table2_html=report(
            table(layout.TABLE2, "html"),
            caption="../report/table2.rst",
            category="Tables",
            labels={"table": "Table 2: ablation"},
        ),
        table2_md=table(layout.TABLE2, "md"),
        table2_tex=table(layout.TABLE2, "tex"),
        per_class_csv=table(layout.PER_CLASS_TABLE, "csv"),
        per_class_html=report(
            table(layout.PER_CLASS_TABLE, "html"),
            caption="../report/per_class.rst",
            category="Tables",
            labels={"table": "Per-class IoU"},
        ),
        per_class_md=table(layout.PER_CLASS_TABLE, "md"),
        sensitivity_csv=table(layout.SENSITIVITY_TABLE, "csv"),
        sensitivity_html=report(
            table(layout.SENSITIVITY_TABLE, "html"),
            caption="../report/sensitivity.rst",
            category="Tables",
            labels={"table": "Sensitivity: 5-class protocol"},
        ),
        sensitivity_md=table(layout.SENSITIVITY_TABLE, "md"),
        statistics_csv=table(layout.STATISTICS_TABLE, "csv"),
        statistics_html=report(
            table(layout.STATISTICS_TABLE, "html"),
            caption="../report/statistics.rst",
            category="Tables",
            labels={"table": "Paired statistics"},
        ),
        statistics_md=table(layout.STATISTICS_TABLE, "md"),
        csv=table(layout.COMPARISON_TABLE, "csv"),
        md=table(layout.COMPARISON_TABLE, "md"),
    log:
        job_log("tables", REPORT_LOG_DIR),
    conda:
        "../envs/pathmamba.yaml"
    resources:
        **slurm_resources("cpu"),
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        experiment_dir=lambda wildcards, input: str(layout.experiment_dir_of(input.runs[0])),
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
        datasets=DATASETS,
        methods=METHODS,
        seeds=SEEDS,
        n_resamples=REPORT_SETTINGS["n_resamples"],
        bootstrap_seed=REPORT_SETTINGS["bootstrap_seed"],
        reference_method=REPORT_SETTINGS["reference_method"],
    shell:
        "python -m pathmamba tables --experiment-dir {params.experiment_dir:q} --datasets {params.datasets:q}"
        " --methods {params.methods:q} --seeds {params.seeds:q} --paper {input.paper:q}"
        " --n-resamples {params.n_resamples:q} --bootstrap-seed {params.bootstrap_seed:q}"
        " --reference-method {params.reference_method:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule figures:
    input:
        histories=run_files(layout.HISTORY),
        # The compute-cost figure reads them; two-stage methods have two more jobs.
        benchmarks=run_files(layout.BENCHMARK_FILES["train"], BENCHMARK_DIR),
        first_stage_benchmarks=expand(
            f"{BENCHMARK_DIR}/{{name}}",
            dataset=DATASETS,
            method=TWO_STAGE_METHODS,
            seed=SEEDS,
            name=[layout.BENCHMARK_FILES[job] for job in ("train_stage1", "pseudo_masks")],
        ),
        runs=run_files(layout.TEST_METRICS),
        # The confusion matrices sum their per-image cells; the trivial reference is drawn too.
        per_image=run_files(layout.PER_IMAGE),
        trivial=expand(f"{TRIVIAL_EXPERIMENT_DIR}/{layout.TEST_METRICS}", dataset=DATASETS),
        masks=run_files(layout.MASKS),
        # The heat maps run the lowest seed's models on the CPU for the few images shown.
        models=expand(f"{EXPERIMENT_DIR}/{layout.MODEL}", dataset=DATASETS, method=METHODS, seed=min(SEEDS)),
        data=[dataset_root(SimpleNamespace(dataset=dataset)) for dataset in DATASETS],
        paper=PAPER_RESULTS,
    output:
        *[
            report(
                dataset_figure("qualitative", dataset),
                caption="../report/qualitative.rst",
                category="Figures",
                labels={"figure": f"Qualitative: {dataset}"},
            )
            for dataset in DATASETS
        ],
        *[
            report(
                dataset_figure("heatmaps", dataset),
                caption="../report/heatmaps.rst",
                category="Figures",
                labels={"figure": f"Heat maps: {dataset}"},
            )
            for dataset in DATASETS
        ],
        *[
            report(
                dataset_figure("confusion", dataset),
                caption="../report/confusion.rst",
                category="Figures",
                labels={"figure": f"Confusion matrices: {dataset}"},
            )
            for dataset in DATASETS
        ],
        report(
            figure(layout.RUN_FIGURES["seed_spread"]),
            caption="../report/seed_spread.rst",
            category="Figures",
            labels={"figure": "mIoU over seeds"},
        ),
        report(
            figure(layout.RUN_FIGURES["ablation"]),
            caption="../report/ablation.rst",
            category="Figures",
            labels={"figure": "Ablation (Table 2)"},
        ),
        report(
            figure(layout.RUN_FIGURES["per_class"]),
            caption="../report/per_class_chart.rst",
            category="Figures",
            labels={"figure": "Per-class IoU"},
        ),
        report(
            figure(layout.RUN_FIGURES["training_curves"]),
            caption="../report/training_curves.rst",
            category="Figures",
            labels={"figure": "Training curves"},
        ),
        report(
            figure(layout.RUN_FIGURES["compute_cost"]),
            caption="../report/compute_cost.rst",
            category="Figures",
            labels={"figure": "Compute cost"},
        ),
        [figure(stem, "pdf") for stem in layout.figure_stems(DATASETS)],
    log:
        job_log("figures", REPORT_LOG_DIR),
    conda:
        "../envs/pathmamba.yaml"
    resources:
        **slurm_resources("cpu"),
        # with the heat maps' models of every CAM-family method and PathMamba loaded at once
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        experiment_dir=lambda wildcards, input: str(layout.experiment_dir_of(input.runs[0])),
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
        datasets=DATASETS,
        methods=METHODS,
        seeds=SEEDS,
        data_roots=[f"{d}={dataset_root(SimpleNamespace(dataset=d))}" for d in DATASETS],
        n_images=max(1, min(REPORT_SETTINGS["n_images"], config["evaluate"]["n_masks"])),
    shell:
        "python -m pathmamba figures --experiment-dir {params.experiment_dir:q} --datasets {params.datasets:q}"
        " --methods {params.methods:q} --seeds {params.seeds:q} --paper {input.paper:q}"
        " --data-root {params.data_roots:q} --n-images {params.n_images:q} --out-dir {params.out_dir:q}"
        " > {log:q} 2>&1"
