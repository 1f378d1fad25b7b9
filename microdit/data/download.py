"""`microdit download`: one source into `raw/<source>/` webdataset shards plus `_summary.json`.

kind `urls`: a URL list (CC12M's tsv, the smoke world's parquet of file:// URLs, any list) goes
through img2dataset, which downloads, checks, resizes and shards; its own `NNNNN_stats.json` and
`NNNNN.parquet` stay beside each shard, and its incremental mode resumes an interrupted run.
Other kinds are the paper's archive/hub sources (`microdit.data.sources`), whose fetchers write
the same layout. Either way `_summary.json` = {"source", "urls", "downloaded", "failed": {reason: n}}
(plus "kind", "shards"), with urls = downloaded + all failures (a fetcher's archive that cannot be
read at all counts as one failure); a source that yields no image at all is an error. A URL list
row whose text is not UTF-8 is kept, decoded with U+FFFD, and counted in "repaired": one bad byte
in a caption should not cost its image, let alone the whole list.

img2dataset reads file:// URLs itself (urllib opens them), so local lists need no server. It
runs in a child process group that dies with this process, so a `kill -9` here leaves none of
its workers behind; the rerun redoes the shards without a (readable) stats file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import typing
from pathlib import Path

from microdit.errors import UserError
from microdit.settings import Download, add_flags
from microdit.data.sources import (COMMON_OPTIONS, FETCHERS, FetchContext, as_bool, as_list, as_optional_str, fetch,
                                   fetcher, parse_options, parse_with)
from microdit.data.sources.images import FETCHER_RESIZE_MODES, ImageOptions
from microdit.data.sources.layout import shard_stats, summarize, top_reasons
from microdit.io import atomic_path, write_json

RESIZE_MODES = typing.get_args(typing.get_type_hints(Download)["resize_mode"])  # fetchers: no, keep_ratio*
ENCODE_FORMATS = ("jpg", "png", "webp")
LIST_FORMATS = ("parquet", "tsv", "csv", "txt", "jsonl")
NOT_UTF8 = "text not utf-8 (replaced)"  # the "repaired" reason of a list row decoded with U+FFFD
# Columns img2dataset writes itself; an extra column by one of these names is saved as source_<name>.
RESERVED_COLUMNS = {"key", "caption", "url", "width", "height", "original_width", "original_height",
                    "status", "error_message", "exif", "md5", "sha256", "sha512"}

URL_OPTIONS = {
    "input_format": (str, "auto", f"{' | '.join(LIST_FORMATS)} | auto (from the file name)"),
    "url_col": (str, "url", "column holding the image URL"),
    "caption_col": (as_optional_str, None, "column holding the caption (none: captions are left empty)"),
    "save_additional_columns": (as_list, [], "comma list of extra columns copied into each sample's json"),
    "column_names": (as_list, None, "column names of a list without a header line (CC12M's tsv: url,caption)"),
    "resize_only_if_bigger": (as_bool, True, "only ever shrink images (false: also upscale to image_size)"),
    "encode_format": COMMON_OPTIONS["encode_format"],
    "encode_quality": COMMON_OPTIONS["encode_quality"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="source name, recorded in _summary.json")
    p.add_argument("--kind", required=True, choices=["urls", *FETCHERS],
                   help="urls: a URL list through img2dataset; otherwise the fetcher of that paper source")
    p.add_argument("--input", default=None,
                   help="urls: the URL list (path or http URL); sa1b: the links file or a directory of tars; "
                        "others: base URL or local directory (default: the dataset's official location)")
    p.add_argument("--out", required=True, help="output directory, e.g. <root>/raw/<source>")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="kind-specific option, repeatable (an unknown key lists the known ones)")
    add_flags(p, "download")  # --image-size, --resize-mode, ...: the `download` config keys
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = options_help()


def options_help() -> str:
    """The --opt keys of every kind, for --help."""
    groups = {"urls": URL_OPTIONS, "every fetcher": COMMON_OPTIONS, **{k: fetcher(k).OPTIONS for k in FETCHERS}}
    lines = ["--opt keys (KEY [default]: meaning):"]
    for group, spec in groups.items():
        lines.append(f"  {group}:")
        for key, (_, default, text) in spec.items():
            if isinstance(default, list):
                default = f"{default[0]}-{default[-1]}" if len(default) > 3 else ",".join(map(str, default))
            lines.append(f"    {key} [{default}]: {text}")
    return "\n".join(lines)


def parse_opt_flags(flags: list[str]) -> dict[str, str]:
    opts = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--opt {flag!r}: expected KEY=VALUE")
        opts[key.strip()] = value.strip()
    return opts


def run(args: argparse.Namespace) -> int:
    raw = parse_opt_flags(args.opt)
    out = Path(args.out)
    if args.samples_per_shard < 1 or args.processes < 1 or args.threads < 1 or args.retries < 0:
        raise UserError("--samples-per-shard, --processes and --threads must be >= 1, --retries >= 0")
    if args.kind == "urls":
        summary = download_url_list(args, _parse_url_options(raw), out)
    else:
        summary = fetch(_fetch_context(args, raw, out))
    if summary["downloaded"] == 0:
        raise UserError(f"{args.source}: 0 of {summary['urls']} images downloaded "
                        f"(top failures: {top_reasons(summary['failed'])}); check --input and the options")
    write_json(out / "_summary.json", summary)
    print(f"{args.source}: {summary['downloaded']} of {summary['urls']} downloaded into {summary['shards']} shards; "
          f"failed: {top_reasons(summary['failed'], k=10)}")
    return 0


def _fetch_context(args: argparse.Namespace, raw: dict[str, str], out: Path) -> FetchContext:
    options = parse_options(args.kind, raw)
    if args.resize_mode not in FETCHER_RESIZE_MODES:
        raise UserError(f"--resize-mode {args.resize_mode}: fetchers support {', '.join(FETCHER_RESIZE_MODES)}")
    _check_encoding(options)
    image = ImageOptions(image_size=max(args.image_size, 0), resize_mode=args.resize_mode,
                         min_image_size=args.min_image_size, encode_format=options["encode_format"],
                         encode_quality=options["encode_quality"])
    return FetchContext(source=args.source, kind=args.kind, input=args.input or fetcher(args.kind).DEFAULT_INPUT,
                        out=out, image=image, samples_per_shard=args.samples_per_shard, workers=args.processes,
                        timeout=args.timeout, retries=args.retries, options=options)


def _parse_url_options(raw: dict[str, str]) -> dict:
    opts = parse_with("urls", URL_OPTIONS, raw)
    _check_encoding(opts)
    return opts


def _check_encoding(opts: dict) -> None:
    if opts["encode_format"] not in ENCODE_FORMATS:
        raise UserError(f"encode_format {opts['encode_format']!r}: expected one of {', '.join(ENCODE_FORMATS)}")


# ---------------------------------------------------------------- kind: urls
def download_url_list(args: argparse.Namespace, opts: dict, out: Path) -> dict:
    if not args.input:
        raise UserError("--kind urls needs --input: the URL list (parquet, tsv, csv, txt or jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    # img2dataset's incremental mode takes every *.json in the folder for a finished shard's stats
    (out / "_summary.json").unlink(missing_ok=True)
    list_path, rows, malformed, not_utf8 = normalise_url_list(args.input, out / "_input", opts, args.timeout,
                                                               args.retries)
    extras = [_saved_name(c) for c in opts["save_additional_columns"]]

    expected = math.ceil(rows / args.samples_per_shard)
    forget_unreadable_stats(out)
    if set(range(expected)) - set(shard_stats(out)):  # else every shard is done: skip img2dataset's start-up
        run_img2dataset(
            url_list=str(list_path), output_folder=str(out), input_format="parquet",
            url_col="url", caption_col="caption", save_additional_columns=extras or None,
            output_format="webdataset", number_sample_per_shard=args.samples_per_shard,
            image_size=max(args.image_size, 1), resize_mode=args.resize_mode if args.image_size > 0 else "no",
            resize_only_if_bigger=opts["resize_only_if_bigger"], min_image_size=args.min_image_size,
            encode_format=opts["encode_format"], encode_quality=opts["encode_quality"],
            processes_count=args.processes, thread_count=args.threads, timeout=args.timeout,
            retries=args.retries, extract_exif=False, enable_wandb=False, distributor="multiprocessing",
            incremental_mode="incremental",
        )
    missing = sorted(set(range(expected)) - set(shard_stats(out)))
    if missing:
        raise UserError(f"{args.source}: {len(missing)} of {expected} shards did not finish (img2dataset's log "
                        "says why); rerun the same command to resume")
    shutil.rmtree(out / "_input", ignore_errors=True)
    summary = summarize(out, args.source, "urls")
    if malformed:  # rows the list reader could not parse never reached img2dataset
        summary["urls"] += malformed
        summary["failed"]["malformed row"] = malformed
    if not_utf8:
        summary["repaired"] = {NOT_UTF8: not_utf8}
    return summary


def forget_unreadable_stats(out: Path) -> None:
    """img2dataset writes a shard's `NNNNN_stats.json` in place, last: one cut short by a kill
    would pass for a finished shard (its incremental mode only checks that the file exists).
    Remove it, so that shard is made again."""
    for path in out.glob("[0-9]*_stats.json"):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            print(f"{path}: unreadable (a run killed while writing it); downloading that shard again", flush=True)
            path.unlink()


def run_img2dataset(**kwargs) -> None:
    """`img2dataset.download(**kwargs)` in a child process leading its own process group, which
    dies whole when this process dies: its worker pool and logger are processes we cannot
    reach, which a `kill -9` of this one would otherwise leave running beside the rerun."""
    import multiprocessing

    from microdit.lifetime import kill_group

    # spawn, not fork: the parent may hold threads (tqdm, a test's HTTP server) mid-lock
    child = multiprocessing.get_context("spawn").Process(target=_img2dataset_in_own_group,
                                                         args=(kwargs, os.getpid()), name="img2dataset")
    child.start()
    try:
        child.join()
    except BaseException:  # Ctrl-C while waiting: img2dataset's processes go with us
        kill_group(child.pid)
        child.join()
        raise
    if child.exitcode != 0:
        raise UserError(f"img2dataset stopped (exit code {child.exitcode}; its log above says why); "
                        "rerun the same command to resume")


def _img2dataset_in_own_group(kwargs: dict, parent_pid: int) -> None:
    from microdit.lifetime import lead_group_that_dies_with_parent

    lead_group_that_dies_with_parent(parent_pid)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import otherwise
    import img2dataset

    img2dataset.download(**kwargs)


def _saved_name(column: str) -> str:
    return f"source_{column}" if column in RESERVED_COLUMNS else column


def normalise_url_list(location: str, work: Path, opts: dict, timeout: float,
                       retries: int) -> tuple[Path, int, int, int]:
    """Rewrite any supported list as `<work>/urls.parquet` with columns url, caption (empty when the
    source has none: the contract wants a .txt per sample) and the extra columns.
    Returns (path, rows, malformed rows skipped, rows whose text was not UTF-8)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from microdit.data.sources.remote import RemoteError, fetch_file

    try:
        path = fetch_file(location, work, timeout, retries)
    except RemoteError as e:
        raise UserError(f"cannot read the URL list {location}: {e}") from None
    fmt = opts["input_format"] if opts["input_format"] != "auto" else _format_from_name(path.name)
    table, malformed = _read_list(path, fmt, opts["column_names"])
    names = table.column_names

    def column(name: str, what: str) -> pa.ChunkedArray:
        if name not in names:
            raise UserError(f"{location}: no {what} column {name!r} (columns: {', '.join(names)}); "
                            "set --opt url_col/caption_col, or column_names for a list without a header")
        return table[name]

    not_utf8: set[int] = set()
    url = pc.fill_null(_as_text(column(opts["url_col"], "url"), not_utf8), "")
    if opts["caption_col"] is not None:
        caption = pc.fill_null(_as_text(column(opts["caption_col"], "caption"), not_utf8), "")
    else:
        caption = pa.array([""] * table.num_rows, pa.string())
    columns = {"url": url, "caption": caption}
    for name in opts["save_additional_columns"]:
        extra = column(name, "extra")
        columns[_saved_name(name)] = _as_text(extra, not_utf8) if _is_binary(extra.type) else extra
    if table.num_rows == 0:
        raise UserError(f"{location}: the URL list is empty")
    out = work / "urls.parquet"
    with atomic_path(out) as tmp:
        pq.write_table(pa.table(columns), tmp)
    return out, table.num_rows, malformed, len(not_utf8)


def _is_binary(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _as_text(values, not_utf8: set[int]):
    """A column as strings. The csv reader gives a column holding invalid UTF-8 as binary, which
    `cast(string)` rejects (ArrowInvalid): decode it value by value with U+FFFD instead, noting
    the rows that needed it."""
    import pyarrow as pa

    if not _is_binary(values.type):
        return values.cast(pa.string())
    texts = []
    for row, value in enumerate(values.to_pylist()):
        try:
            texts.append(None if value is None else value.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(value.decode("utf-8", errors="replace"))
            not_utf8.add(row)
    return pa.chunked_array([pa.array(texts, pa.string())])


def _format_from_name(name: str) -> str:
    stem = name[:-3] if name.endswith(".gz") else name
    suffix = stem.rsplit(".", 1)[-1].lower()
    if suffix not in LIST_FORMATS:
        raise UserError(f"{name}: cannot tell the list format from the name; set --opt input_format=...")
    return suffix


def _read_list(path: Path, fmt: str, column_names: list[str] | None):
    """A pyarrow table of the list, and how many malformed rows were skipped."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    malformed = 0

    def skip_row(_row) -> str:
        nonlocal malformed
        malformed += 1
        return "skip"

    try:
        if fmt == "parquet":
            return pq.read_table(path), 0
        if fmt == "jsonl":
            return pjson.read_json(path), 0
        if fmt == "txt":
            read = pcsv.ReadOptions(column_names=column_names or ["url"])
            parse = pcsv.ParseOptions(delimiter="\x1f", quote_char=False, invalid_row_handler=skip_row)
            return pcsv.read_csv(path, read_options=read, parse_options=parse), malformed
        if fmt in ("tsv", "csv"):
            read = pcsv.ReadOptions(column_names=column_names) if column_names else pcsv.ReadOptions()
            # captions hold stray quotes; only csv uses quoting
            parse = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",",
                                      quote_char=False if fmt == "tsv" else '"', invalid_row_handler=skip_row)
            convert = pcsv.ConvertOptions(strings_can_be_null=False)
            table = pcsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
            return table, malformed
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for unreadable input
        raise UserError(f"{path}: cannot read it as {fmt} ({e})") from None
    raise UserError(f"input_format {fmt!r}: expected one of {', '.join(LIST_FORMATS)}")
