"""What every report section uses: the list of unusable inputs, readers for JSON, training logs and
images, the number check, and matplotlib figures as `data:` URIs (the object API: no pyplot, no
global backend)."""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

from microdit.io import read_json

MAX_EMBED_BYTES = 3 << 20  # larger images are shrunk before embedding, so the page stays openable


class Problems(list):
    """Files that could not be used; shown at the top of the page, printed, fatal with --strict."""

    def add(self, path: Path, why: str) -> None:
        self.append(f"{path}: {why}")


def load_any(path: Path, problems: Problems) -> Any:
    """The JSON value in `path`; None when the file is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.add(path, f"unreadable JSON ({e}); left out")
        return None


def load_json(path: Path, problems: Problems) -> dict | None:
    """A JSON object from `path`; None when the file is absent, unreadable or not an object."""
    obj = load_any(path, problems)
    if obj is not None and not isinstance(obj, dict):
        problems.add(path, f"expected a JSON object, found {type(obj).__name__}; left out")
        return None
    return obj


def read_metrics(path: Path, problems: Problems) -> list[dict]:
    """Rows of a training log; broken lines (e.g. the last one of a killed run) are counted."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    if bad:
        problems.add(path, f"{bad} malformed line(s) skipped")
    return sorted(rows, key=lambda r: r["step"])


def image_uri(path: Path, problems: Problems) -> str | None:
    """A `data:` URI of the image at `path`, shrunk to JPEG when it is too big to embed."""
    from PIL import Image

    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = (im.format or "PNG").lower()
            if len(data) > MAX_EMBED_BYTES or fmt not in ("png", "jpeg", "gif", "webp"):
                im = im.convert("RGB")
                im.thumbnail((2048, 2048))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                data, fmt = buf.getvalue(), "jpeg"
    except Exception as e:  # PIL raises many kinds for a corrupt file
        problems.add(path, f"unreadable image ({type(e).__name__}: {e}); left out")
        return None
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


def is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def figure(width: float, height: float, **margins):
    """A figure with fixed margins in inches (layout engines draw everything twice: slow)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    m = {"left": 0.5, "right": 0.15, "bottom": 0.45, "top": 0.3, **margins}
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width, bottom=m["bottom"] / height,
                        top=1 - m["top"] / height, wspace=m.get("wspace", 0.25))
    return fig


def png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def stage_numbers(config: dict | None, root: Path) -> list[int]:
    """The run's training stages: the config's `train.stages`, else the stage directories under
    `root`, else the paper's four."""
    import re

    stages = ((config or {}).get("train") or {}).get("stages")
    if isinstance(stages, dict) and stages:
        return sorted(int(k.removeprefix("stage")) for k in stages if re.fullmatch(r"stage\d+", k))
    found = sorted(int(m.group(1)) for p in (root / "checkpoints").glob("stage*")
                   if (m := re.fullmatch(r"stage(\d+)", p.name)) and p.is_dir())
    return found or [1, 2, 3, 4]
