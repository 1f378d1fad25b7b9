"""`microdit <command>`: one entry point; each stage of the DAG is one subcommand.

Every command lives in its own module exposing `add_arguments(parser)` and `run(args)`.
Modules are imported lazily so `microdit --help` stays fast and a missing optional
dependency only breaks the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from microdit.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("microdit.data.shapes", "generate the synthetic shapes world (smoke preset) as file:// URL lists"),
    "models": ("microdit.zoo", "materialise every model the DAG needs as HF-format directories"),
    "download": ("microdit.data.download", "download one source into webdataset shards (img2dataset or a fetcher)"),
    "caption": ("microdit.data.caption", "caption a downloaded source with LLaVA into a parquet file"),
    "mds": ("microdit.data.mds", "convert a downloaded source + captions into MDS shards"),
    "latents": ("microdit.data.latents", "precompute VAE latents and caption embeddings into MDS shards"),
    "funnel": ("microdit.data.funnel", "write the per-source data funnel JSON"),
    "train": ("microdit.train", "run one training stage (resumable, preemptible, torchrun-aware)"),
    "evaluate": ("microdit.evaluate", "generate evaluation images and compute FID, CLIP score and GenEval"),
    "cost": ("microdit.cost", "wall time, GPU-hours and dollars per phase and stage, and a full-run projection"),
    "report": ("microdit.report", "build the self-contained results/report.html"),
    "keys": ("microdit.keys", "every config key with its smoke value and help (config.yaml's reference)"),
    "dvc": ("microdit.dvc", "generate dvc.yaml (and params.yaml) from the Snakemake DAG, or check it is current"),
}


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "usage: microdit COMMAND [options]   (microdit COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"microdit: unknown command '{name}'\n\n{_help()}", file=sys.stderr)
        return 2
    args = None
    try:
        module = importlib.import_module(COMMANDS[name][0])
        parser = argparse.ArgumentParser(prog=f"microdit {name}", description=COMMANDS[name][1])
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT
        print(f"microdit {name}: interrupted", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"microdit {name}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"microdit {name}: error: missing file: {e.filename or e}", file=sys.stderr)
        return 2
    except Exception as e:
        from microdit.io import space_errno, space_message

        where = getattr(args, "out", None)
        number = space_errno(e, where)
        if number is None:
            raise
        # the error's own path when it has one, else the command's output: the filesystem that is full
        path = e.filename if isinstance(e, OSError) and e.errno == number else None
        print(f"microdit {name}: error: {space_message(number, path or where or 'the device')}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m microdit.cli` / `torchrun -m microdit.cli`
    sys.exit(main())
