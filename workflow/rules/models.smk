# Models phase: every model the DAG needs, as HF-format directories under <root>/models/<role>/.
# Smoke builds tiny ones locally (the VAE trains briefly on the shapes world); paper snapshots hub ids.


def models_inputs(wildcards):
    if config["models"]["source"] != "build":
        return []
    # the tiny tokenizer is trained on the world's captions and the tiny VAE on its images
    return [f"{ROOT}/world/{s}.parquet" for s in TRAIN_SOURCES if world_input(s)]


def models_args():
    m = config["models"]
    args = [f"--source {m['source']}"]
    for role, spec in sorted(m["roles"].items()):
        args.append("--id " + q(f"{role}={spec['id']}"))
        if spec["path"]:
            args.append("--local " + q(f"{role}={spec['path']}"))
    args.append(SETTINGS.flags("models.build", m["build"], top={"seed": config["seed"]}))
    return " ".join(args)


rule world:
    """Smoke preset: generate the shapes world and its file:// URL lists."""
    output:
        expand("{root}/world/{source}.parquet", root=ROOT, source=sorted(config["world"]["counts"])),
    params:
        counts=" ".join("--count " + q(f"{k}={v}") for k, v in sorted(config["world"]["counts"].items())),
        flags=SETTINGS.flags("world", config["world"], top={"seed": config["seed"]}),
    threads: res("world", "threads")
    resources:
        **group_resources("world"),
    log:
        f"{ROOT}/logs/world.log",
    benchmark:
        f"{ROOT}/benchmarks/world.tsv"
    conda:
        "../../envs/data.yaml",
    shell:
        "{MICRODIT} world --out {ROOT:q}/world {params.counts} {params.flags} > {log:q} 2>&1"


rule models:
    """Materialise every model role (tiny local builds, hub snapshots, or local directories)."""
    input:
        models_inputs,
    output:
        [model_info(role) for role in MODEL_ROLES],
    params:
        args=models_args(),
        captions=lambda w, input: " ".join(f"--captions {q(p)}" for p in input),
    threads: res("models", "threads")
    resources:
        **group_resources("models"),
    log:
        f"{ROOT}/logs/models.log",
    benchmark:
        f"{ROOT}/benchmarks/models.tsv"
    conda:
        "../../envs/evaluate.yaml",
    shell:
        "{MICRODIT} models --out {ROOT:q}/models {params.args} {params.captions} > {log:q} 2>&1"
