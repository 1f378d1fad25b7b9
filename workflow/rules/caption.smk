# Caption phase: LLaVA captions for sources that come without them (SA-1B in the paper).


rule caption:
    input:
        raw=lambda w: f"{raw_dir(w.source)}/_summary.json",
        model=model_info("captioner"),
    output:
        f"{ROOT}/captions/{{source}}.parquet",
    params:
        raw=lambda w: raw_dir(w.source),
        c=config["caption"],
        # LLaVA is not run on images the MDS stage will drop anyway
        min_size=lambda w: config["sources"][w.source].get("min_size", config["mds"]["min_size"]),
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
        " --prompt {params.c[prompt]:q} --max-new-tokens {params.c[max_new_tokens]}"
        " --batch-size {params.c[batch_size]} --dtype {params.c[dtype]} --min-size {params.min_size}"
        " --device {config[device]} > {log:q} 2>&1"
