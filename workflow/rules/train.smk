rule train:
    input:
        data=dataset_root,
        validated=VALIDATION_REPORT,
        weights=pretrained_weights,
    output:
        model=f"{RUN_DIR}/model.pt",
        history=f"{RUN_DIR}/history.csv",
        run=f"{RUN_DIR}/run.json",
    params:
        hparams=lambda wildcards: as_json(method_hparams(config, wildcards.method)),
        settings=lambda wildcards: as_json(train_settings(config, wildcards.method)),
        checkpoint_dir=f"{RESULTS}/checkpoints/{{dataset}}/{{method}}/seed{{seed}}",
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
    log:
        f"{LOG_DIR}/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/{{method}}/seed{{seed}}/train.tsv"
    threads: config["threads_per_job"]
    # Cluster resources (ignored by local runs). The GPU itself is requested by the SLURM profiles
    # (workflow/profiles/slurm*/): a `gpu` rule resource would also be counted on local runs.
    # Memory and time grow with each `--retries` attempt; time is sized from the plan's estimate.
    resources:
        mem_mb=lambda wildcards, attempt: 10000 * attempt,
        runtime=lambda wildcards, attempt: runtime_minutes(
            train_gpu_hours(config, wildcards.dataset, wildcards.method), attempt
        ),
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba train --method {wildcards.method} --dataset {wildcards.dataset}"
        " --data-root {input.data} --seed {wildcards.seed} --out {params.out_dir}"
        " --checkpoint-dir {params.checkpoint_dir} --hparams '{params.hparams}'"
        " --settings '{params.settings}' --threads {threads} 2> {log}"
