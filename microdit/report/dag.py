"""The report's rule graph: a `snakemake --rulegraph` dot file read and laid out as SVG boxes."""
from __future__ import annotations

import colorsys
import re
from collections import defaultdict
from pathlib import Path

from microdit.report.common import Problems


_DOT_NODE = re.compile(r"^\s*(\w+)\s*\[(.*)\]\s*;?\s*$")
_DOT_EDGE = re.compile(r"^\s*(\w+)\s*->\s*(\w+)")
_DOT_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def parse_dot(text: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Nodes {id: {label, color}} and edges of a `snakemake --rulegraph` (or --dag) dot graph."""
    nodes: dict[str, dict] = {}
    edges: list[tuple[str, str]] = []
    for line in text.splitlines():
        if m := _DOT_EDGE.match(line):
            edges.append((m[1], m[2]))
        elif (m := _DOT_NODE.match(line)) and m[1] not in ("graph", "node", "edge"):
            attrs = dict(_DOT_ATTR.findall(m[2]))
            nodes[m[1]] = {"label": attrs.get("label", m[1]), "color": attrs.get("color", "")}
    for a, b in edges:
        for n in (a, b):
            nodes.setdefault(n, {"label": n, "color": ""})
    return nodes, edges


def _dot_color(hsv: str) -> str:
    """Graphviz 'h s v' in [0, 1] to a hex colour; grey when absent or not HSV."""
    try:
        h, s, v = (float(x) for x in hsv.replace(",", " ").split())
    except ValueError:
        return "#777777"
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def layout_dag(nodes: dict[str, dict], edges: list[tuple[str, str]]) -> dict:
    """Columns by longest path from the inputs (so every edge points right), ordered to cut crossings."""
    preds, succs = defaultdict(set), defaultdict(set)
    for a, b in edges:
        if a != b:
            preds[b].add(a)
            succs[a].add(b)
    # Kahn's algorithm; depth = longest path from a node without inputs
    depth = {n: 0 for n in nodes}
    waiting = {n: len(preds[n]) for n in nodes}
    ready = sorted(n for n in nodes if waiting[n] == 0)
    seen = set()
    while ready:
        n = ready.pop()
        seen.add(n)
        for m in succs[n]:
            depth[m] = max(depth[m], depth[n] + 1)
            waiting[m] -= 1
            if waiting[m] == 0:
                ready.append(m)
    last = max(depth.values(), default=0) + 1
    for n in nodes:  # nodes on a cycle (not a real rule graph) go after everything else
        if n not in seen:
            depth[n] = last
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for n in sorted(nodes, key=lambda n: nodes[n]["label"]):
        layers[depth[n]].append(n)
    layers = [layer for layer in layers if layer]
    depth = {n: d for d, layer in enumerate(layers) for n in layer}

    # a few barycentre sweeps: place each node near the mean position of its neighbours before/after
    def position(layer):
        return {n: i / max(len(layer) - 1, 1) for i, n in enumerate(layer)}

    def mean_at(neighbours, placed):
        xs = [placed[m] for m in neighbours if m in placed]
        return sum(xs) / len(xs) if xs else 0.5

    for _ in range(4):
        for r in range(1, len(layers)):
            before = {n: p for layer in layers[:r] for n, p in position(layer).items()}
            layers[r].sort(key=lambda n: mean_at(preds[n], before))
        for r in range(len(layers) - 2, -1, -1):
            after = {n: p for layer in layers[r + 1:] for n, p in position(layer).items()}
            layers[r].sort(key=lambda n: mean_at(succs[n], after))

    # left to right: one column per depth, boxes centred in their column and stacked top to bottom
    char_w, box_h, gap_x, gap_y, margin = 7.5, 28, 56, 18, 12
    width_of = {n: 20 + char_w * len(nodes[n]["label"]) for n in nodes}
    col_w = [max(width_of[n] for n in col) for col in layers]
    col_h = [len(col) * box_h + (len(col) - 1) * gap_y for col in layers]
    height = max(col_h, default=0) + 2 * margin
    boxes, x = {}, margin
    for c, col in enumerate(layers):
        y = margin + (height - 2 * margin - col_h[c]) / 2
        for n in col:
            color = _dot_color(nodes[n]["color"])
            boxes[n] = {"id": n, "label": nodes[n]["label"], "x": round(x + (col_w[c] - width_of[n]) / 2, 1),
                        "y": round(y, 1), "w": round(width_of[n], 1), "h": box_h, "stroke": color, "fill": _tint(color)}
            y += box_h + gap_y
        x += col_w[c] + gap_x
    paths = []
    for a, b in sorted(set(edges)):
        if a == b:
            continue
        A, B = boxes[a], boxes[b]
        x1, y1 = A["x"] + A["w"], A["y"] + A["h"] / 2
        x2, y2 = B["x"] - 3, B["y"] + B["h"] / 2
        mid = (x1 + x2) / 2
        paths.append({"d": f"M{x1:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {x2:.1f},{y2:.1f}",
                      "from": A["label"], "to": B["label"]})
    width = round(x - gap_x + margin) if layers else 2 * margin
    return {"width": width, "height": round(height), "boxes": list(boxes.values()), "edges": paths,
            "depth": {nodes[n]["label"]: depth[n] for n in nodes}}


def _tint(hex_color: str, keep: float = 0.15) -> str:
    """`hex_color` mixed mostly with white, for box fills."""
    rgb = [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - c) * keep):02x}" for c in rgb)


def dag_section(dag_path: Path, problems: Problems) -> dict | None:
    if not dag_path.is_file():
        return None
    text = dag_path.read_text(errors="replace")
    nodes, edges = parse_dot(text)
    if "digraph" not in text or not nodes:
        problems.add(dag_path, "no dot digraph found; rule graph left out")
        return None
    return layout_dag(nodes, edges)
