# Report phase: the resolved config, the rule graph, cost accounting and results/report.html.
import json as _json

# `snakemake --report results/snakemake-report.html`: Snakemake's own report of this run (outputs
# marked `report(...)` below and in the other rule files, runtimes, software); results/report.html
# stays the main one.
report: "../report/workflow.rst"


rule resolved_config:
    """The merged, validated config the run used (rerun whenever any key changes).

    A `run:` rule executes inside Snakemake's own process, so it has no conda env (Snakemake would
    ignore one); it only needs microdit.io, on the path the Snakefile sets up."""
    output:
        report(f"{RESULTS}/config.json", caption="../report/config.rst", category="Configuration"),
    params:
        text=_json.dumps(config, sort_keys=True),
    run:
        from microdit.io import write_json

        write_json(output[0], _json.loads(params.text))


rule dag:
    """The rule graph in dot format, drawn by the report (no graphviz needed).

    Runs Snakemake itself with the driver's Python, so no conda env (snakemake is in none of envs/)."""
    input:
        f"{RESULTS}/config.json",
    output:
        f"{RESULTS}/dag.dot",
    params:
        snakefile=workflow.main_snakefile,
    log:
        f"{ROOT}/logs/dag.log",
    shell:
        "{PYTHON:q} -m snakemake -s {params.snakefile:q} --configfile {input:q} --rulegraph --nolock"
        " > {output:q} 2> {log:q}"


rule cost:
    input:
        config=f"{RESULTS}/config.json",
        train=[f"{ROOT}/checkpoints/stage{s}/summary.json" for s in STAGES],
        evals=[f"{RESULTS}/eval/{tag}/metrics.json" for tag in EVAL_TAGS],
        funnel=f"{RESULTS}/data/funnel.json",
    output:
        report(f"{RESULTS}/cost.json", caption="../report/cost.rst", category="Cost"),
    params:
        flags=SETTINGS.flags("cost", config["cost"]),
    resources:
        **group_resources("report"),
    log:
        f"{ROOT}/logs/cost.log",
    benchmark:
        f"{ROOT}/benchmarks/cost.tsv"
    conda:
        "../../envs/report.yaml",
    shell:
        "{MICRODIT} cost --root {ROOT:q} --results {RESULTS:q} --config {input.config:q} --out {output:q}"
        " {params.flags} > {log:q} 2>&1"


rule report:
    input:
        config=f"{RESULTS}/config.json",
        dag=f"{RESULTS}/dag.dot",
        cost=f"{RESULTS}/cost.json",
        funnel=f"{RESULTS}/data/funnel.json",
        evals=[f"{RESULTS}/eval/{tag}/metrics.json" for tag in EVAL_TAGS],
        train=[f"{ROOT}/checkpoints/stage{s}/summary.json" for s in STAGES],  # curves and sample grids
    output:
        report(f"{RESULTS}/report.html", caption="../report/report.rst", category="Report"),
    resources:
        **group_resources("report"),
    log:
        f"{ROOT}/logs/report.log",
    benchmark:
        f"{ROOT}/benchmarks/report.tsv"
    conda:
        "../../envs/report.yaml",
    shell:
        "{MICRODIT} report --results {RESULTS:q} --root {ROOT:q} --config {input.config:q} --dag {input.dag:q}"
        " --out {output:q} > {log:q} 2>&1"
