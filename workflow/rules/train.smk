# Training phase: the stages of `train.stages` (the paper's four), chained. Each stage starts from the
# previous stage's final weights; a stage at a higher resolution rebuilds pos_embed inside
# `microdit train`. A rerun resumes from the newest checkpoint; Slurm preemption (SIGTERM) saves one
# and exits 143.

wildcard_constraints:
    stage=constraint("stage", "|".join(map(str, STAGES))),


def stage_cfg(stage):
    return config["train"]["stages"][f"stage{stage}"]


def stage_sources(stage):
    """Training sources used in a stage (a source's `stages` list narrows it, e.g. DiffusionDB)."""
    return [s for s in TRAIN_SOURCES if int(stage) in config["sources"][s].get("stages", STAGES)
            and config["sources"][s]["weight"] > 0]


def train_inputs(wildcards):
    stage = int(wildcards.stage)
    inputs = {
        "latents": [f"{ROOT}/latents/{s}/_summary.json" for s in stage_sources(stage)],
        "vae": model_info("vae"),
        "text_encoder": model_info("text_encoder"),
    }
    if config["train"]["eval_every"]:
        inputs["eval_models"] = [model_info("detector"), model_info("clip")]
    if stage > 1:
        inputs["previous"] = f"{ROOT}/checkpoints/stage{stage - 1}/summary.json"
    return inputs


def train_args(wildcards):
    """The `train` section and this stage's keys as flags (microdit.settings), and the stage's files."""
    stage = int(wildcards.stage)
    args = [f"--stage {stage}",
            SETTINGS.flags("train", config["train"], top={"seed": config["seed"], "device": config["device"]}),
            SETTINGS.flags("train.stages.*", stage_cfg(stage))]
    args += ["--latents " + q(f"{ROOT}/latents/{src}") for src in stage_sources(stage)]
    args.append("--weights " + " ".join(q(f"{src}={config['sources'][src]['weight']}") for src in stage_sources(stage)))
    if stage > 1:
        args.append("--init " + q(f"{ROOT}/checkpoints/stage{stage - 1}/final"))
    args += ["--vae " + q(f"{ROOT}/models/vae"), "--text-encoder " + q(f"{ROOT}/models/text_encoder")]
    if config["train"]["eval_every"]:  # the in-training GenEval's detector (and CLIP for its colours)
        args += ["--detector " + q(f"{ROOT}/models/detector"), "--clip " + q(f"{ROOT}/models/clip")]
    return " ".join(args)


rule train:
    input:
        unpack(train_inputs),
    output:
        f"{ROOT}/checkpoints/stage{{stage}}/summary.json",
        samples=report(f"{ROOT}/checkpoints/stage{{stage}}/samples.png", caption="../report/train_samples.rst",
                       category="Training", subcategory="stage{stage}"),
    params:
        launch=launcher("train"),
        args=train_args,
    threads: res("train", "threads")
    resources:
        **group_resources("train"),
    log:
        f"{ROOT}/logs/train/stage{{stage}}.log",
    benchmark:
        f"{ROOT}/benchmarks/train/stage{{stage}}.tsv"
    conda:
        "../../envs/train.yaml",
    shell:
        "{params.launch} train --out {ROOT:q}/checkpoints/stage{wildcards.stage} {params.args} > {log:q} 2>&1"
