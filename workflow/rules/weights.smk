# ImageNet weights of the ResNet backbones, fetched once on the submitting host (compute nodes are
# often offline). A method uses them with `hparams: {pretrained: <resources_dir>/weights/<backbone>-imagenet.pth}`
# (wsss-tissue's DeepLabV3+ encoder: `segmenter_pretrained`); `none` disables them (tests, demo).


localrules:
    fetch_weights,


rule fetch_weights:
    output:
        f"{RESOURCES}/{layout.WEIGHTS}",
    log:
        f"{RESOURCES}/{layout.WEIGHTS_LOG}",
    wildcard_constraints:
        backbone="resnet18|resnet34|resnet50|resnet101",
    conda:
        "../envs/pathmamba.yaml"
    params:
        # `--url <mirror>`, or nothing for torchvision's URL (a list, for `:q`).
        url=lambda wildcards: (
            ["--url", config["weights_urls"][wildcards.backbone]]
            if wildcards.backbone in config.get("weights_urls", {})
            else []
        ),
    shell:
        "python -m pathmamba fetch-weights --backbone {wildcards.backbone:q} --out {output:q} {params.url:q}"
        " > {log:q} 2>&1"
