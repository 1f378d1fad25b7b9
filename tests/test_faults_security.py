"""Fault suite, security (issue 12): hostile archives, unsafe loaders in the source, markup in the
report. (Config strings reaching a shell are test_faults_workflow.py's.)"""
from __future__ import annotations

import ast
import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

import microdit
from microdit.data.sources.archives import LINK, UNSAFE_PATH
from test_sources import download, image, make_zip, read_out

# ---------------------------------------------------------------- hostile archives


def files_outside(tmp_path: Path, out: Path) -> set[str]:
    return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if out not in (p, *p.parents)}


def hostile_tar(path: Path, outside: Path) -> None:
    """Names that climb out or are absolute, links out of the archive, and one honest image."""
    def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        add(tarfile.TarInfo("sa_1.jpg"), image(seed=1))
        add(tarfile.TarInfo("../sa_2.jpg"), image(seed=2))
        add(tarfile.TarInfo(f"{outside}/sa_3.jpg"), image(seed=3))  # absolute
        for name, kind, target in (("sa_4.jpg", tarfile.SYMTYPE, "/etc/passwd"),
                                   ("sa_5.jpg", tarfile.LNKTYPE, "../../outside/x.jpg"),
                                   ("escape", tarfile.SYMTYPE, str(outside))):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            add(info)
        add(tarfile.TarInfo("escape/sa_6.jpg"), image(seed=6))  # written "through" the link if extracted


def test_hostile_tar_members_are_refused_and_counted(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile_tar(tmp_path / "site" / "sa_000000.tar", outside)
    before = files_outside(tmp_path, tmp_path / "raw")
    out = tmp_path / "raw" / "sa1b"
    assert download("sa1b", str(tmp_path / "site"), out) == 0
    summary, samples = read_out(out)
    assert summary["failed"] == {UNSAFE_PATH: 2, LINK: 2}  # the link named `escape` is no image: not counted
    # escape/sa_6.jpg is a regular member read from the archive itself: nothing goes through the link
    assert sorted(samples) == ["sa_1", "sa_6"] and samples["sa_6"].image == image(seed=6)
    assert files_outside(tmp_path, tmp_path / "raw") == before and not any(outside.iterdir())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("sa1b: 2 of 6 downloaded into 1 shards; failed: ")
    assert sorted(line.split("failed: ")[1].split(", ")) == [f"{LINK} x2", f"{UNSAFE_PATH} x2"]


def hostile_zip(path: Path, members: list[tuple[str, bytes]], outside: Path) -> None:
    make_zip(path, members)
    with zipfile.ZipFile(path, "a") as zf:
        for name, data in ((f"../{members[0][0]}", members[0][1]), (f"{outside}/abs.{name_ext(members)}", b"x")):
            zf.writestr(zipfile.ZipInfo(name), data)
        link = zipfile.ZipInfo(f"link.{name_ext(members)}")
        link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16  # as `zip --symlinks` stores it
        zf.writestr(link, "/etc/passwd")


def name_ext(members: list[tuple[str, bytes]]) -> str:
    return members[0][0].rsplit(".", 1)[1]


def test_hostile_zip_members_are_refused_and_counted(tmp_path):
    """DiffusionDB (its own zip reader) and TextCaps (the shared zipped-source reader)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    site = tmp_path / "site"
    prompts = {n: {"p": f"prompt {n}"} for n in ("u1.webp", "abs.webp", "link.webp")}
    hostile_zip(site / "diffusiondb-large-part-1/part-000001.zip",
                [("u0.webp", image(fmt="WEBP", seed=0)), ("u1.webp", image(fmt="WEBP", seed=1)),
                 ("part-000001.json", json.dumps({"u0.webp": {"p": "prompt u0"}, **prompts}).encode())], outside)
    captions = [{"image_id": i, "caption_str": f"caption {i}", "image_path": f"train/{i}.jpg"}
                for i in ("t0", "abs", "link")]
    (site / "data/textcaps").mkdir(parents=True)
    (site / "data/textcaps/TextCaps_0.1_train.json").write_text(json.dumps({"data": captions}))
    hostile_zip(site / "images/train_val_images.zip", [("t0.jpg", image(seed=0))], outside)
    before = files_outside(tmp_path, tmp_path / "raw")

    out = tmp_path / "raw" / "diffusiondb"
    assert download("diffusiondb", str(site), out, "--opt", "parts=1", "--opt", "nsfw_threshold=none") == 0
    summary, samples = read_out(out)
    assert sorted(samples) == ["u0", "u1"]  # ../u0.webp is a second u0: refused, not a duplicate key
    assert summary["failed"] == {UNSAFE_PATH: 2, LINK: 1}

    out = tmp_path / "raw" / "textcaps"
    assert download("textcaps", str(site), out, "--opt", "splits=train") == 0
    summary, samples = read_out(out)
    assert sorted(samples) == ["t0"] and summary["failed"] == {UNSAFE_PATH: 1, LINK: 1}
    assert files_outside(tmp_path, tmp_path / "raw") == before and not any(outside.iterdir())


@pytest.mark.parametrize("name, unsafe", [
    ("sa_1.jpg", False), ("./000/abc.jpg", False), ("a..b.jpg", False), ("dir/..hidden.jpg", False),
    ("../x.jpg", True), ("a/../../x.jpg", True), ("/etc/x.jpg", True), ("..", True),
    ("C:\\x.jpg", True), ("\\\\host\\share\\x.jpg", True), ("a\\..\\..\\x.jpg", True),
])
def test_unsafe_member_names(name, unsafe):
    from microdit.data.sources.archives import unsafe_name

    assert unsafe_name(name) is unsafe


# ---------------------------------------------------------------- loaders in the source

ALLOWED_PICKLE_NAMES = {"UnpicklingError", "PicklingError"}  # catching what torch.load(weights_only) raises
UNSAFE_YAML = {"load", "load_all", "full_load", "full_load_all", "unsafe_load", "unsafe_load_all"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def unsafe_loads(source: str) -> list[str]:
    """`line: what` for every way `source` could run code hidden in a file it reads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _dotted(node.value) in ("pickle", "cPickle", "dill") \
                and node.attr not in ALLOWED_PICKLE_NAMES:
            found.append(f"{node.lineno}: {_dotted(node)}")
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill"):
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name not in ALLOWED_PICKLE_NAMES]
        if not isinstance(node, ast.Call):
            continue
        name, where = _dotted(node.func), node.lineno
        if name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name.startswith("yaml.") and name.split(".", 1)[1] in UNSAFE_YAML:
            found.append(f"{where}: {name} (use yaml.safe_load)")
        if name.endswith(("np.load", "numpy.load")) and _keyword(node, "allow_pickle") is True:
            found.append(f"{where}: {name}(allow_pickle=True)")
        if name.endswith(("read_pickle", "joblib.load")) or name in ("eval", "exec"):
            found.append(f"{where}: {name}")
        if name.endswith((".extractall", ".extract")) or name == "shutil.unpack_archive":
            found.append(f"{where}: {name} (extracts members under their own names)")
        if _keyword(node, "trust_remote_code") is True:
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_the_scan_finds_each_unsafe_load():
    hostile = """
import pickle, yaml, torch, numpy as np, tarfile, shutil
from pickle import loads
pickle.load(f); pickle.loads(b); pickle.Unpickler(f)
torch.load(p); torch.load(p, weights_only=False); torch.load(p, map_location="cpu", weights_only=True)
yaml.load(t); yaml.load(t, Loader=yaml.SafeLoader); yaml.unsafe_load(t); yaml.full_load(t); yaml.safe_load(t)
np.load(p, allow_pickle=True); np.load(p)
tarfile.open(p).extractall(d); shutil.unpack_archive(p, d)
AutoModel.from_pretrained(p, trust_remote_code=True); eval(s); model.eval()
try:
    pass
except pickle.UnpicklingError:
    pass
"""
    assert sorted(f.split(": ", 1)[1] for f in unsafe_loads(hostile)) == sorted([
        "from pickle import loads", "pickle.load", "pickle.loads", "pickle.Unpickler",
        "torch.load without weights_only=True", "torch.load without weights_only=True",
        "yaml.load (use yaml.safe_load)", "yaml.load (use yaml.safe_load)", "yaml.unsafe_load (use yaml.safe_load)",
        "yaml.full_load (use yaml.safe_load)", "np.load(allow_pickle=True)",
        ".extractall (extracts members under their own names)",
        "shutil.unpack_archive (extracts members under their own names)",
        "trust_remote_code=True", "eval"])


def test_the_package_loads_no_file_unsafely():
    """Every torch.load passes weights_only=True, YAML is only ever safe_load'ed, pickle is only
    named to catch UnpicklingError (microdit/checkpoint.py), and nothing extracts an archive."""
    package = Path(microdit.__file__).parent
    found = {str(path.relative_to(package)): unsafe_loads(path.read_text()) for path in sorted(package.rglob("*.py"))}
    assert {path: lines for path, lines in found.items() if lines} == {}
    assert len(found) > 30  # the scan saw the package


# ---------------------------------------------------------------- markup in the report

SCRIPT = "<script>alert(1)</script>"
ATTRIBUTE = '"><img src=x onerror=alert(1)>'


def test_captions_and_prompts_stay_text_in_the_report(tmp_path):
    from microdit.io import read_json, write_json
    from microdit.report import build_report
    from test_report import FUNNEL, section_text, write_full

    results, root = tmp_path / "results", tmp_path / "data"
    write_full(results, root)
    write_json(root / "checkpoints" / "stage1" / "samples.json", {"prompts": [SCRIPT, ATTRIBUTE]})
    config = read_json(results / "config.json")
    config["preset"] = SCRIPT  # in the title, the header and the summary table
    config["sources"] = {ATTRIBUTE: {"role": SCRIPT}, **config["sources"]}
    write_json(results / "config.json", config)
    funnel = json.loads(json.dumps(FUNNEL))
    funnel["sources"][ATTRIBUTE] = {**funnel["sources"]["shapes_eval"], "source": ATTRIBUTE,
                                    "download_failed": {SCRIPT: 3}}
    write_json(results / "data" / "funnel.json", funnel)
    (results / "eval" / "stage2" / "metrics.json").write_text("{" + SCRIPT)  # a problem line quotes the file

    out = results / "report.html"
    build_report(results, root, out)
    html = out.read_text()
    assert "<script" not in html.lower() and "<img src=x" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3
    assert SCRIPT in section_text(html, "samples") and ATTRIBUTE in section_text(html, "samples")
    assert ATTRIBUTE in section_text(html, "data") and f"{SCRIPT} 3" in section_text(html, "data")
