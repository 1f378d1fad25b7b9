# Latents phase: VAE latents at every training resolution + caption embeddings, into MDS shards.
# With several GPUs the rule runs one process per GPU under torchrun; each writes its own shards.


rule latents:
    input:
        mds=f"{ROOT}/mds/{{source}}/_summary.json",
        vae=model_info("vae"),
        text_encoder=model_info("text_encoder"),
    output:
        f"{ROOT}/latents/{{source}}/_summary.json",
    params:
        launch=launcher("latents"),
        flags=SETTINGS.flags("latents", config["latents"], top={"device": config["device"], "seed": config["seed"]}),
    threads: res("latents", "threads")
    resources:
        **group_resources("latents"),
    log:
        f"{ROOT}/logs/latents/{{source}}.log",
    benchmark:
        f"{ROOT}/benchmarks/latents/{{source}}.tsv"
    conda:
        "../../envs/encode.yaml",
    shell:
        "{params.launch} latents --mds {ROOT:q}/mds/{wildcards.source} --out {ROOT:q}/latents/{wildcards.source}"
        " --vae {ROOT:q}/models/vae --text-encoder {ROOT:q}/models/text_encoder"
        " {params.flags} > {log:q} 2>&1"
