rule make_demo_data:
    output:
        directory(f"{RESOURCES}/datasets/{{dataset}}"),
    params:
        synthetic=lambda wildcards: config["datasets"][wildcards.dataset]["synthetic"],
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba make-demo-data --dataset {wildcards.dataset} --out {output}"
        " --n-train {params.synthetic[n_train]} --n-val {params.synthetic[n_val]}"
        " --n-test {params.synthetic[n_test]} --size {params.synthetic[size]}"
        " --seed {params.synthetic[seed]} 2> {log}"
