rule evaluate:
    input:
        model=f"{EXPERIMENT_DIR}/{layout.MODEL}",
        data=dataset_root,
        # The data must be the files that were validated (its fingerprint), not only a folder of that name.
        validated=VALIDATION_REPORT,
    output:
        metrics=f"{EXPERIMENT_DIR}/{layout.TEST_METRICS}",
        per_image=f"{EXPERIMENT_DIR}/{layout.PER_IMAGE}",
        masks=directory(f"{EXPERIMENT_DIR}/{layout.MASKS}"),
    log:
        job_log("evaluate"),
    # Time and peak memory (max_rss) against the mem_mb request; not part of the training cost figure.
    benchmark:
        benchmark_file("evaluate")
    conda:
        "../envs/pathmamba.yaml"
    threads: config["threads_per_job"]
    resources:
        **slurm_resources("gpu"),
        gpu=gpu_units,
        mem_mb=lambda wildcards, attempt: 6000 * attempt,
        runtime=lambda wildcards, attempt: gpu_runtime_minutes(
            evaluate_gpu_hours(config, wildcards.dataset, wildcards.method), attempt
        ),
    params:
        n_masks=config["evaluate"]["n_masks"],
        tta="--tta" if config["evaluate"]["tta"] else "--no-tta",
        device=job_device,
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "python -m pathmamba evaluate --model {input.model:q} --data-root {input.data:q}"
        " --validated {input.validated:q} --out {params.out_dir:q} --masks-dir {output.masks:q}"
        " --n-masks {params.n_masks:q} {params.tta:q} --device {params.device:q} --threads {threads:q}"
        " > {log:q} 2>&1"


rule evaluate_trivial:
    input:
        data=dataset_root,
        validated=VALIDATION_REPORT,
    output:
        metrics=f"{TRIVIAL_EXPERIMENT_DIR}/{layout.TEST_METRICS}",
        per_image=f"{TRIVIAL_EXPERIMENT_DIR}/{layout.PER_IMAGE}",
    log:
        f"{RESULTS}/{layout.TRIVIAL_LOG}",
    conda:
        "../envs/pathmamba.yaml"
    resources:
        **slurm_resources("cpu"),
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        dataset=dataset_argument,
    shell:
        "python -m pathmamba evaluate-trivial --dataset {params.dataset:q} --data-root {input.data:q}"
        " --validated {input.validated:q} --out {params.out_dir:q} > {log:q} 2>&1"
