rule train:
    input:
        unpack(first_stage_outputs),
        data=dataset_root,
        validated=VALIDATION_REPORT,
        weights=pretrained_weights,
    output:
        model=f"{EXPERIMENT_DIR}/{layout.MODEL}",
        history=f"{EXPERIMENT_DIR}/{layout.HISTORY}",
        run=f"{EXPERIMENT_DIR}/{layout.RUN_RECORD}",
    log:
        job_log("train"),
    benchmark:
        benchmark_file("train")
    conda:
        "../envs/pathmamba.yaml"
    threads: config["threads_per_job"]
    # `gpu`: one GPU per job at a time on a workstation (common.smk); on SLURM the executor plugin asks
    # for it (`--gpus`, or `--gres` with `slurm.gpu_gres`). Memory and time (cluster only) grow with each
    # `--retries` attempt; time is sized from the plan, at most `slurm.max_runtime_hours`.
    resources:
        **slurm_resources("gpu"),
        gpu=gpu_units,
        mem_mb=lambda wildcards, attempt: 10000 * attempt,
        runtime=lambda wildcards, attempt: gpu_runtime_minutes(
            train_gpu_hours(config, wildcards.dataset, wildcards.method), attempt
        ),
    params:
        hparams=lambda wildcards: as_json(method_hparams(config, wildcards.method)),
        settings=lambda wildcards: as_json(train_settings(config, wildcards.method)),
        stage=first_stage_options,
        checkpoint_dir=CHECKPOINT_DIR,
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        dataset=dataset_argument,
    shell:
        "python -m pathmamba train --method {wildcards.method:q} --dataset {params.dataset:q}"
        " --data-root {input.data:q} --validated {input.validated:q} --seed {wildcards.seed:q}"
        " --out {params.out_dir:q} --checkpoint-dir {params.checkpoint_dir:q} --hparams {params.hparams:q}"
        " --settings {params.settings:q} {params.stage:q} --threads {threads:q} > {log:q} 2>&1"


# The first stage of a two-stage method: the same training command with `--stage 1`, its own config
# block (`methods.<method>.stage1`), outputs, checkpoints, log and benchmark.
use rule train as train_stage1 with:
    input:
        data=dataset_root,
        validated=VALIDATION_REPORT,
        weights=lambda wildcards: pretrained_weights(wildcards, stage=1),
    output:
        model=STAGE1_MODEL,
        history=f"{STAGE1_DIR}/{layout.HISTORY}",
        run=f"{STAGE1_DIR}/{layout.RUN_RECORD}",
    log:
        job_log("train_stage1"),
    benchmark:
        benchmark_file("train_stage1")
    wildcard_constraints:
        method=any_of(TWO_STAGE_METHODS),
    resources:
        **slurm_resources("gpu", stage=1),
        gpu=lambda wildcards: gpu_units(wildcards, stage=1),
        mem_mb=lambda wildcards, attempt: 10000 * attempt,
        runtime=lambda wildcards, attempt: gpu_runtime_minutes(
            train_gpu_hours(config, wildcards.dataset, wildcards.method, stage=1), attempt
        ),
    params:
        hparams=lambda wildcards: as_json(method_hparams(config, wildcards.method, stage=1)),
        settings=lambda wildcards: as_json(train_settings(config, wildcards.method, stage=1)),
        stage=["--stage", "1"],
        checkpoint_dir=f"{CHECKPOINT_DIR}/{layout.STAGE1}",
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        dataset=dataset_argument,


# The first stage's pseudo masks of every training image, written once (palette PNGs, one folder per
# mask kind); the second stage trains on them.
rule pseudo_masks:
    input:
        model=STAGE1_MODEL,
        data=dataset_root,
        validated=VALIDATION_REPORT,
    output:
        directory(PSEUDO_MASKS),
    log:
        job_log("pseudo_masks"),
    benchmark:
        benchmark_file("pseudo_masks")
    wildcard_constraints:
        method=any_of(TWO_STAGE_METHODS),
    conda:
        "../envs/pathmamba.yaml"
    threads: config["threads_per_job"]
    resources:
        **slurm_resources("gpu", stage=1),
        gpu=lambda wildcards: gpu_units(wildcards, stage=1),
        mem_mb=lambda wildcards, attempt: 6000 * attempt,
        runtime=lambda wildcards, attempt: gpu_runtime_minutes(
            pseudo_masks_gpu_hours(config, wildcards.dataset, wildcards.method), attempt
        ),
    params:
        device=lambda wildcards: job_device(wildcards, stage=1),
    shell:
        "python -m pathmamba pseudo-masks --model {input.model:q} --data-root {input.data:q}"
        " --validated {input.validated:q} --out {output:q} --device {params.device:q} --threads {threads:q}"
        " > {log:q} 2>&1"
