rule make_demo_data:
    output:
        directory(f"{RESOURCES}/datasets/{{dataset}}"),
    wildcard_constraints:
        dataset=any_of(datasets_with("synthetic")),
    params:
        synthetic=lambda wildcards: config["datasets"][wildcards.dataset]["synthetic"],
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    log:
        f"{RESULTS}/logs/data/{{dataset}}.log",
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba make-demo-data --dataset {wildcards.dataset} --out {output}"
        " --n-train {params.synthetic[n_train]} --n-val {params.synthetic[n_val]}"
        " --n-test {params.synthetic[n_test]} --size {params.synthetic[size]}"
        " --seed {params.synthetic[seed]} 2> {log}"


# Needs the internet: runs on the submitting host (login nodes have it, compute nodes often not). The
# declared output is a small record, so the download folder (and its resumable partial files) survives
# a failed or interrupted job.
rule download_dataset:
    output:
        f"{RESOURCES}/downloads/{{dataset}}.json",
    params:
        folder=f"{RESOURCES}/downloads/{{dataset}}",
        url=lambda wildcards: config["datasets"][wildcards.dataset].get("url", ""),
    wildcard_constraints:
        dataset=any_of(datasets_with("source", "url")),
    localrule: True
    log:
        f"{RESULTS}/logs/data/{{dataset}}.download.log",
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba download-dataset --dataset {wildcards.dataset} --folder {params.folder}"
        " --record {output} --url {params.url:q} 2> {log}"


# Checks the sources against the checksum lock (written on the first preparation), extracts and lays
# them out canonically with a manifest.json.
rule prepare_dataset:
    input:
        prepare_sources,
    output:
        directory(f"{RESOURCES}/datasets/{{dataset}}"),
    params:
        lock=f"{RESOURCES}/checksums/{{dataset}}.json",
        sources=source_arguments,
    wildcard_constraints:
        dataset=any_of(datasets_with("source", "url", "archive")),
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    log:
        f"{RESULTS}/logs/data/{{dataset}}.prepare.log",
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba prepare-dataset --dataset {wildcards.dataset} --out {output}"
        " --lock {params.lock} {params.sources} 2> {log}"


# Every image and mask decoded and checked; fails with a summary naming every bad file (in the log).
rule validate_dataset:
    input:
        data=dataset_root,
    output:
        VALIDATION_REPORT,
    params:
        image_size=lambda wildcards: validation_option(wildcards, "image_size"),
        counts=lambda wildcards: validation_option(wildcards, "counts"),
    threads: config["threads_per_job"]
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    log:
        f"{RESULTS}/logs/data/{{dataset}}.validate.log",
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba validate-dataset --dataset {wildcards.dataset} --data-root {input.data}"
        " --out {output} --image-size {params.image_size} --counts {params.counts} --workers {threads}"
        " 2> {log}"
