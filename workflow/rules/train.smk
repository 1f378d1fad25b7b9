# Training phase: the paper's four stages, chained. Each stage starts from the previous stage's
# final weights; the 512 px stages rebuild pos_embed (pos_interp_scale 2.0) inside `microdit train`.
# A rerun resumes from the newest checkpoint; Slurm preemption (SIGTERM) saves one and exits 143.

STAGES = [1, 2, 3, 4]

wildcard_constraints:
    stage=constraint("stage", "[1-4]"),


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
    if stage > 1:
        inputs["previous"] = f"{ROOT}/checkpoints/stage{stage - 1}/summary.json"
    return inputs


def train_args(wildcards):
    stage = int(wildcards.stage)
    s, t = stage_cfg(stage), config["train"]
    args = [
        f"--stage {stage}", f"--model {t['model']}", f"--caption-channels {t['caption_channels']}",
        f"--resolution {s['resolution']}", f"--mask-ratio {s['mask_ratio']}", f"--steps {s['steps']}",
        f"--global-batch {s['global_batch']}", f"--micro-batch {min(t['micro_batch'], s['global_batch'])}",
        f"--lr {s['lr']}", f"--schedule {s['schedule']}", f"--warmup {s['warmup']}",
        f"--final-lr-ratio {s['final_lr_ratio']}", f"--p-mean {s['p_mean']}", f"--p-std {s['p_std']}",
        f"--grad-clip {s['grad_clip']}", "--ema" if s["ema"] else "--no-ema",
        f"--ema-decay {t['ema_decay']}", f"--ema-start {s['ema_start']}", f"--moe-lr-scale {t['moe_lr_scale']}",
        f"--ckpt-every {t['ckpt_every']}", f"--keep {t['keep']}", f"--keep-superseded {t['keep_superseded']}",
        f"--log-every {t['log_every']}",
        f"--seed {config['seed']}", f"--device {config['device']}",
    ]
    if not t["patch_mixer"]:
        args.append("--no-patch-mixer")
    args += ["--latents " + q(f"{ROOT}/latents/{src}") for src in stage_sources(stage)]
    args.append("--weights " + " ".join(f"{src}={config['sources'][src]['weight']}" for src in stage_sources(stage)))
    if stage > 1:
        args.append("--init " + q(f"{ROOT}/checkpoints/stage{stage - 1}/final"))
        if s["init_optimizer"]:
            args.append("--init-optimizer")
    if t["compile"]:
        args.append("--compile")
    if t["fsdp"]:
        args.append("--fsdp")
    args += ["--vae " + q(f"{ROOT}/models/vae"), "--text-encoder " + q(f"{ROOT}/models/text_encoder")]
    args += [f"--sample-prompt {q(p)}" for p in t["sample_prompts"]]
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
