"""The report page from its template (`microdit/templates/report.html.j2`), with the filters that
format its numbers."""
from __future__ import annotations

import math
from typing import Any

from microdit.report.common import is_num


def _fmt_num(x: Any) -> str:
    """Numbers as people read them: thousands separators, a few significant digits, '—' for none."""
    if x is None or x == "":
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    if isinstance(x, int) or x.is_integer():
        return f"{int(x):,}"
    if abs(x) >= 1e7 or abs(x) < 1:
        return f"{x:.3g}"
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.2f}".rstrip("0").rstrip(".")


def _fmt_fixed(x: Any, decimals: int = 2, sign: bool = False) -> str:
    """Fixed decimals, as result tables print them (FID 12.72, GenEval 0.46)."""
    if not is_num(x):
        return "—"
    return f"{x:+,.{decimals}f}" if sign else f"{x:,.{decimals}f}"


def _fmt_dollars(x: Any) -> str:
    if not is_num(x):
        return "—"
    return f"${x:,.0f}" if abs(x) >= 100 else f"${x:,.2f}" if abs(x) >= 0.01 else f"${x:.2g}"


def _fmt_duration(seconds: Any) -> str:
    if not is_num(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _fmt_bytes(n: Any) -> str:
    if not is_num(n):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("microdit", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_fmt_num, fixed=_fmt_fixed, dollars=_fmt_dollars, duration=_fmt_duration, size=_fmt_bytes)
    return env.get_template("report.html.j2").render(**context)
