rule train:
    input:
        data=dataset_root,
    output:
        model=f"{RUN_DIR}/model.pt",
        history=f"{RUN_DIR}/history.csv",
        run=f"{RUN_DIR}/run.json",
    params:
        hparams=lambda wildcards: as_json(method_hparams(config, wildcards.method)),
        settings=lambda wildcards: as_json(train_settings(config, wildcards.method)),
        checkpoint_dir=f"{RESULTS}/checkpoints/{{dataset}}/{{method}}/seed{{seed}}",
        out_dir=RUN_DIR,
    log:
        f"{LOG_DIR}/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{dataset}}/{{method}}/seed{{seed}}/train.tsv"
    threads: config["threads_per_job"]
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba train --method {wildcards.method} --dataset {wildcards.dataset}"
        " --data-root {input.data} --seed {wildcards.seed} --out {params.out_dir}"
        " --checkpoint-dir {params.checkpoint_dir} --hparams '{params.hparams}'"
        " --settings '{params.settings}' --threads {threads} 2> {log}"
