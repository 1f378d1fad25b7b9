# Data phase: download every source into webdataset shards, convert to MDS, and the data funnel.


rule download:
    """img2dataset for URL lists; a fetcher of the same output format for archive/hub sources."""
    input:
        lambda w: world_input(w.source),
    output:
        f"{ROOT}/raw/{{source}}/_summary.json",
    params:
        src=lambda w: config["sources"][w.source],
        opts=lambda w: cli_options(config["sources"][w.source]["options"]),
        flags=SETTINGS.flags("download", config["download"]),
    threads: res("download", "threads")
    resources:
        **group_resources("download"),
    log:
        f"{ROOT}/logs/download/{{source}}.log",
    benchmark:
        f"{ROOT}/benchmarks/download/{{source}}.tsv"
    conda:
        "../../envs/data.yaml",
    shell:
        "{MICRODIT} download --source {wildcards.source} --kind {params.src[kind]}"
        " --input {params.src[input]:q} --out {ROOT:q}/raw/{wildcards.source} {params.opts}"
        " {params.flags} > {log:q} 2>&1"


def mds_inputs(wildcards):
    src = config["sources"][wildcards.source]
    inputs = {"raw": f"{raw_dir(wildcards.source)}/_summary.json"}
    if src["captions"] == "llava":
        inputs["captions"] = f"{ROOT}/captions/{wildcards.source}.parquet"
    return inputs


rule mds:
    """Images + chosen captions -> mosaicml-streaming MDS shards (min-size filter, resize)."""
    input:
        unpack(mds_inputs),
    output:
        f"{ROOT}/mds/{{source}}/_summary.json",
    params:
        raw=lambda w: raw_dir(w.source),
        captions=lambda w, input: f"--captions {q(input.captions)}" if "captions" in input.keys() else "",
        flags=lambda w: SETTINGS.flags("mds", config["mds"], **source_min_size(w.source)),
    threads: res("mds", "threads")
    resources:
        **group_resources("mds"),
    log:
        f"{ROOT}/logs/mds/{{source}}.log",
    benchmark:
        f"{ROOT}/benchmarks/mds/{{source}}.tsv"
    conda:
        "../../envs/data.yaml",
    shell:
        "{MICRODIT} mds --raw {params.raw:q} --out {ROOT:q}/mds/{wildcards.source} {params.captions}"
        " {params.flags} --workers {threads} > {log:q} 2>&1"


rule funnel:
    """Per-source data funnel (URLs -> downloaded -> captioned -> MDS -> latents) for the report."""
    input:
        [f"{raw_dir(s)}/_summary.json" for s in SOURCES],
        [f"{ROOT}/mds/{s}/_summary.json" for s in SOURCES],
        [f"{ROOT}/captions/{s}.parquet" for s in LLAVA_SOURCES],
        [f"{ROOT}/latents/{s}/_summary.json" for s in TRAIN_SOURCES],
    output:
        report(f"{RESULTS}/data/funnel.json", caption="../report/funnel.rst", category="Data"),
    params:
        sources=" ".join(f"--source {q(s + '=' + config['sources'][s].get('raw_from', s))}" for s in SOURCES),
    threads: 1
    resources:
        **group_resources("report"),
    log:
        f"{ROOT}/logs/funnel.log",
    benchmark:
        f"{ROOT}/benchmarks/funnel.tsv"
    conda:
        "../../envs/data.yaml",
    shell:
        "{MICRODIT} funnel --root {ROOT:q} {params.sources} --out {output:q} > {log:q} 2>&1"
