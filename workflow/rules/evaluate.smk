# Evaluation phase: FID, CLIP score and GenEval for the untrained model (stage0, the baseline), the
# checkpoints named in `evaluate.stages` (from their EMA weights where the stage kept one) and the
# released checkpoints in `evaluate.released` (tag released-<name>), all the same way.
from microdit.config import released_checkpoints as _released_checkpoints

RELEASED = {spec["tag"]: spec for spec in _released_checkpoints(config)}
EVAL_TAGS = ["stage0"] + [f"stage{s}" for s in sorted(config["evaluate"]["stages"])] + list(RELEASED)

wildcard_constraints:
    tag=constraint("tag", "|".join(EVAL_TAGS)),


def eval_source():
    if not EVAL_SOURCES:
        raise WorkflowError("config: evaluation needs a source with `role: eval` (smoke: shapes_eval, paper: coco)")
    return EVAL_SOURCES[0]


def evaluate_inputs(wildcards):
    inputs = {
        "eval_mds": f"{ROOT}/mds/{eval_source()}/_summary.json",
        "models": [model_info(role) for role in ("vae", "text_encoder", "clip", "fid", "detector")],
    }
    if wildcards.tag in RELEASED:  # a file given by path (a released name is fetched by the job itself)
        if RELEASED[wildcards.tag]["name"] is None:
            inputs["checkpoint"] = RELEASED[wildcards.tag]["path"]
    elif wildcards.tag != "stage0":
        inputs["checkpoint"] = f"{ROOT}/checkpoints/{wildcards.tag}/summary.json"
    if config["evaluate"]["captions_file"]:  # a fixed caption list: a changed file reruns the evaluation
        inputs["captions"] = config["evaluate"]["captions_file"]
    return inputs


def evaluate_args(wildcards):
    """What is evaluated, the `evaluate` section as flags (microdit.settings), and the files."""
    t = config["train"]
    if wildcards.tag == "stage0":  # the untrained baseline: built like the final stage's model
        what = (f"--untrained --model {q(t['model'])} --resolution {t['stages'][f'stage{FINAL_STAGE}']['resolution']} "
                + SETTINGS.flags("train", {k: t[k] for k in ("caption_channels", "patch_mixer")}))
    elif wildcards.tag in RELEASED:
        r = RELEASED[wildcards.tag]
        what = (f"--released {q(r['path'])} --model {q(r['model'])} --resolution {r['resolution']}"
                f" --pos-interp-scale {r['pos_interp_scale']}")
    else:
        ema = t["stages"][wildcards.tag]["ema"]
        what = f"--checkpoint {q(f'{ROOT}/checkpoints/{wildcards.tag}/final')}" + (" --ema" if ema else "")
    args = [
        what, f"--eval-mds {q(f'{ROOT}/mds/{eval_source()}')}",
        *(f"--{role.replace('_', '-')} {q(f'{ROOT}/models/{role}')}" for role in ("vae", "text_encoder", "clip", "fid", "detector")),
        SETTINGS.flags("evaluate", config["evaluate"], top={"seed": config["seed"], "device": config["device"]}),
        f"--cache {q(f'{ROOT}/eval_cache')}",
    ]
    return " ".join(args)


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        report(f"{RESULTS}/eval/{{tag}}/metrics.json", caption="../report/eval_metrics.rst",
               category="Evaluation", subcategory="{tag}"),
        grid=report(f"{RESULTS}/eval/{{tag}}/grid.png", caption="../report/eval_grid.rst",
                    category="Evaluation", subcategory="{tag}"),
    params:
        launch=launcher("evaluate"),
        args=evaluate_args,
    threads: res("evaluate", "threads")
    resources:
        **group_resources("evaluate"),
    log:
        f"{ROOT}/logs/evaluate/{{tag}}.log",
    benchmark:
        f"{ROOT}/benchmarks/evaluate/{{tag}}.tsv"
    conda:
        "../../envs/evaluate.yaml",
    shell:
        "{params.launch} evaluate --tag {wildcards.tag} {params.args} --out {RESULTS:q}/eval/{wildcards.tag}"
        " > {log:q} 2>&1"

