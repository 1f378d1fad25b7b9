"""`microdit <command>`: one entry point; each stage of the DAG is one subcommand.

Every command lives in its own module exposing `add_arguments(parser)` and `run(args)`.
Modules are imported lazily so `microdit --help` stays fast and a missing optional
dependency only breaks the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "world": ("microdit.data.shapes", "generate the synthetic shapes world (smoke preset) as file:// URL lists"),
    "models": ("microdit.zoo", "materialise every model the DAG needs as HF-format directories"),
    "download": ("microdit.data.download", "download one source into webdataset shards (img2dataset or a fetcher)"),
    "caption": ("microdit.data.caption", "caption a downloaded source with LLaVA into a parquet file"),
    "mds": ("microdit.data.mds", "convert a downloaded source + captions into MDS shards"),
    "latents": ("microdit.data.latents", "precompute VAE latents and caption embeddings into MDS shards"),
    "funnel": ("microdit.data.funnel", "write the per-source data funnel JSON"),
}


class UserError(Exception):
    """An error caused by input the user controls; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microdit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if "--help" in sys.argv or "-h" in sys.argv:
            # only import the module whose help is asked for
            if name in sys.argv:
                importlib.import_module(module).add_arguments(p)
        else:
            p.set_defaults(_lazy=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and not ({"-h", "--help"} & set(argv)):
        name = argv[0]
        module = importlib.import_module(COMMANDS[name][0])
        p = argparse.ArgumentParser(prog=f"microdit {name}", description=COMMANDS[name][1])
        module.add_arguments(p)
        args = p.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except UserError as e:
            print(f"microdit {name}: error: {e}", file=sys.stderr)
            return 2
        except FileNotFoundError as e:
            print(f"microdit {name}: error: missing file: {e.filename or e}", file=sys.stderr)
            return 2
    build_parser().parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
