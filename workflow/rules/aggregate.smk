rule aggregate:
    input:
        trivial=expand(f"{RESULTS}/runs/{{dataset}}/trivial/test_metrics.json", dataset=DATASETS),
        runs=expand(
            f"{RESULTS}/runs/{{dataset}}/{{method}}/seed{{seed}}/test_metrics.json",
            dataset=DATASETS,
            method=METHODS,
            seed=SEEDS,
        ),
    output:
        csv=f"{RESULTS}/tables/comparison.csv",
        md=f"{RESULTS}/tables/comparison.md",
    log:
        f"{RESULTS}/logs/aggregate.log",
    conda:
        "../envs/pathmamba.yaml"
    shell:
        "python -m pathmamba aggregate {input.runs} {input.trivial}"
        " --out-csv {output.csv} --out-md {output.md} 2> {log}"
