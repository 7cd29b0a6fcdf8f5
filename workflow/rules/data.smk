rule make_demo_data:
    input:
        dataset_description,
    output:
        directory(DATASET_DIR),
    log:
        f"{RESULTS}/{layout.DATASET_LOGS}.log",
    wildcard_constraints:
        dataset=any_of(datasets_with("synthetic")),
    conda:
        "../envs/pathmamba.yaml"
    resources:
        **slurm_resources("cpu"),
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        synthetic=lambda wildcards: config["datasets"][wildcards.dataset]["synthetic"],
        dataset=dataset_argument,
    shell:
        "python -m pathmamba make-demo-data --dataset {params.dataset:q} --out {output:q}"
        " --n-train {params.synthetic[n_train]:q} --n-val {params.synthetic[n_val]:q}"
        " --n-test {params.synthetic[n_test]:q} --size {params.synthetic[size]:q}"
        " --seed {params.synthetic[seed]:q} > {log:q} 2>&1"


# Needs the internet: runs on the submitting host (login nodes have it, compute nodes often not). The
# declared output is a small record, so the download folder (and its resumable partial files) survives
# a failed or interrupted job.
rule download_dataset:
    output:
        f"{RESOURCES}/{layout.DOWNLOAD_RECORD}",
    log:
        f"{RESULTS}/{layout.DATASET_LOGS}.download.log",
    wildcard_constraints:
        dataset=any_of(datasets_with("source", "url")),
    localrule: True
    conda:
        "../envs/pathmamba.yaml"
    params:
        folder=f"{RESOURCES}/{layout.DOWNLOADS}",
        # `--url <url>`, or nothing for the Google Drive folder (a list, for `:q`).
        url=lambda wildcards: (
            ["--url", config["datasets"][wildcards.dataset]["url"]]
            if "url" in config["datasets"][wildcards.dataset]
            else []
        ),
        dataset=dataset_argument,
    shell:
        "python -m pathmamba download-dataset --dataset {params.dataset:q} --folder {params.folder:q}"
        " --record {output:q} {params.url:q} > {log:q} 2>&1"


# Checks the sources against the checksum lock (written on the first preparation), extracts and lays
# them out canonically with a manifest.json.
rule prepare_dataset:
    input:
        prepare_sources,
    output:
        directory(DATASET_DIR),
    log:
        f"{RESULTS}/{layout.DATASET_LOGS}.prepare.log",
    wildcard_constraints:
        dataset=any_of(datasets_with("source", "url", "archive")),
    conda:
        "../envs/pathmamba.yaml"
    resources:
        **slurm_resources("cpu"),
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        lock=f"{RESOURCES}/{layout.CHECKSUMS}",
        sources=source_arguments,
        dataset=dataset_argument,
    shell:
        "python -m pathmamba prepare-dataset --dataset {params.dataset:q} --out {output:q}"
        " --lock {params.lock:q} {params.sources:q} > {log:q} 2>&1"


# Every image and mask decoded and checked; fails with a summary naming every bad file (in the log).
rule validate_dataset:
    input:
        data=dataset_root,
        description=dataset_description,
    output:
        VALIDATION_REPORT,
    log:
        f"{RESULTS}/{layout.DATASET_LOGS}.validate.log",
    conda:
        "../envs/pathmamba.yaml"
    threads: config["threads_per_job"]
    resources:
        **slurm_resources("cpu"),
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        image_size=lambda wildcards: validation_option(wildcards, "image_size"),
        counts=lambda wildcards: validation_option(wildcards, "counts"),
        dataset=dataset_argument,
    shell:
        "python -m pathmamba validate-dataset --dataset {params.dataset:q} --data-root {input.data:q}"
        " --out {output:q} --image-size {params.image_size:q} --counts {params.counts:q} --workers {threads:q}"
        " > {log:q} 2>&1"
