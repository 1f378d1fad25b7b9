# Caption phase: LLaVA captions for sources that come without them (SA-1B in the paper).


rule caption:
    input:
        raw=lambda w: f"{raw_dir(w.source)}/_summary.json",
        model=model_info("captioner"),
    output:
        f"{ROOT}/captions/{{source}}.parquet",
    params:
        raw=lambda w: raw_dir(w.source),
        flags=SETTINGS.flags("caption", config["caption"], top={"device": config["device"]}),
        # LLaVA is not run on images the MDS stage will drop anyway
        min_size=lambda w: source_min_size(w.source).get("min_size", config["mds"]["min_size"]),
    threads: res("caption", "threads")
    resources:
        **group_resources("caption"),
    log:
        f"{ROOT}/logs/caption/{{source}}.log",
    benchmark:
        f"{ROOT}/benchmarks/caption/{{source}}.tsv"
    conda:
        "../../envs/encode.yaml",
    shell:
        "{MICRODIT} caption --raw {params.raw:q} --out {output:q} --model {ROOT:q}/models/captioner"
        " {params.flags} --min-size {params.min_size} > {log:q} 2>&1"
