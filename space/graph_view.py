"""The graph panel: the pruned graph as an SVG the browser can click, plus the CSS and JS it needs.

Nodes sit by layer (rows) and token position (columns), features of one (layer, position) side by side,
edges coloured by sign and sized by weight. Every node carries data-node (its id) and data-label (hover
text); GRAPH_JS turns clicks into an event for the details panel."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from clt_hub.attribution.supernodes import collapse
from space.text import html_text, short, shown

if TYPE_CHECKING:
    from space.state import Session

PER_ROW, STEP, COL_W, LEFT = 5, 13, 78, 54  # features per line in a cell, their spacing, column width, margin
PALETTE = ["#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#4d7c0f", "#c2410c", "#1d4ed8", "#be123c"]


def graph_html(session: Session, collapsed: bool = False, max_edges: int = 600) -> str:
    """The SVG of the session's pruned graph; `collapsed` draws each supernode as one node, edges summed."""
    nodes, a = _nodes(session, collapsed)
    L, T = session.result.graph.n_layers, session.result.graph.n_pos
    tops, heights, width, height = _place(nodes, L, T)
    return _draw(session, nodes, a, tops, heights, width, height, max_edges)


def _nodes(session: Session, collapsed: bool) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """One record per drawn node (kind, cell, hover text, supernode ring) and the kept edges between them."""
    g, p = session.result.graph, session.result.pruned
    kept = session.kept()
    where = {n: k for k, n in enumerate(kept)}
    groups = [(s[0], [where[session.index[m]] for m in s[1:]]) for s in session.supernodes]
    ring = {session.index[m]: gi for gi, s in enumerate(session.supernodes) for m in s[1:]}
    kept_t = torch.tensor(kept, dtype=torch.long)
    a = g.block(kept_t) * p.block(kept_t)
    if collapsed and groups:
        a, members = collapse(a, [m for _, m in groups])
    else:
        members = [[k] for k in range(len(kept))]
    nodes: list[dict[str, Any]] = []
    for v, m in enumerate(members):
        idx = [kept[k] for k in m]
        if collapsed and v < len(groups):
            nodes.append(_supernode_record(session, groups[v][0], v, idx))
        else:
            nodes.append(_node_record(session, idx[0], -1 if collapsed else ring.get(idx[0], -1)))
    return nodes, a


def _cell(g: Any, i: int) -> tuple[int, int]:
    """Node i's (row, column): tokens on row 0, layer l's features and errors on row l + 1, logits on top."""
    L, T = g.n_layers, g.n_pos
    if i < g.n_features:
        return int(g.features[i, 0]) + 1, int(g.features[i, 1])
    if i < g.token_index(0):
        layer, pos = divmod(i - g.n_features, T)
        return layer + 1, pos
    if i < g.logit_index(0):
        return 0, i - g.token_index(0)
    return L + 1, T - 1


def _supernode_record(session: Session, name: str, group: int, idx: list[int]) -> dict[str, Any]:
    """A collapsed supernode, drawn at the mean cell of its members."""
    cells = [_cell(session.result.graph, i) for i in idx]
    row = round(sum(c[0] for c in cells) / len(cells))
    col = round(sum(c[1] for c in cells) / len(cells))
    listed = ", ".join(session.result.node_name(i) for i in idx[:6]) + (" …" if len(idx) > 6 else "")
    return {"id": f"supernode:{name}", "kind": "supernode", "row": row, "col": col, "order": -1.0,
            "text": name, "group": group, "hover": f"supernode {name}: {len(idx)} features ({listed})"}


def _node_record(session: Session, i: int, group: int) -> dict[str, Any]:
    """One node of the graph, with its hover text; `group` is the supernode ring it is drawn in (-1: none)."""
    r = session.result
    g = r.graph
    row, col = _cell(g, i)
    kind = ("feature" if i < g.n_features else "error" if i < g.token_index(0) else
            "token" if i < g.logit_index(0) else "logit")
    hover = session.describe(i)
    if kind == "feature":
        hover += f" · act {float(g.activations[i]):.3g}"
    elif kind == "token":
        hover = f"token {shown(r.tokens[col])!r} (position {col})"
    elif kind == "error":
        hover += " (MLP reconstruction error)"
    return {"id": session.records[i]["node_id"], "kind": kind, "row": row, "col": col,
            "order": float(r.pruned.cumulative[i]) + (1.0 if kind == "error" else 0.0), "text": "",
            "group": group, "hover": hover, "logit": i - g.logit_index(0) if kind == "logit" else -1}


def _place(nodes: list[dict[str, Any]], L: int, T: int) -> tuple[dict[int, int], dict[int, int], int, int]:
    """Give every node x, y: side by side within its cell, most influential first. Returns each row's top
    and height and the picture's size."""
    by_cell: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for n in nodes:
        by_cell.setdefault((n["row"], n["col"]), []).append(n)
    slots: dict[tuple[int, int], int] = {}
    for key, items in by_cell.items():
        items.sort(key=lambda n: n["order"])
        used = 0
        for n in items:
            if n["kind"] == "supernode":
                used = math.ceil(used / PER_ROW) * PER_ROW
                n["slot"] = used
                used += PER_ROW
            elif n["kind"] == "logit":
                n["slot"] = 0
            else:
                n["slot"] = used
                used += 1
        slots[key] = used
    heights = {}
    for row in range(L + 2):
        lines = max([math.ceil(slots.get((row, c), 0) / PER_ROW) for c in range(T)] + [1])
        heights[row] = 30 if row == L + 1 else lines * STEP + 22
    tops, y = {}, 26
    for row in range(L + 1, -1, -1):
        tops[row] = y
        y += heights[row]
    for n in nodes:
        cx = LEFT + n["col"] * COL_W + COL_W / 2
        if n["kind"] == "logit":
            n["x"], n["y"] = cx - 30 * n["logit"], tops[n["row"]] + 12
        else:
            line, k = divmod(n["slot"], PER_ROW)
            n["x"] = cx if n["kind"] == "supernode" else cx + (k - (PER_ROW - 1) / 2) * STEP
            n["y"] = tops[n["row"]] + 12 + line * STEP
    return tops, heights, LEFT + T * COL_W + 20, y + 46


def _shape(n: dict[str, Any], logit_texts: list[str]) -> str:
    x, y = n["x"], n["y"]
    if n["kind"] == "feature":
        ring = (f' stroke="{PALETTE[n["group"] % len(PALETTE)]}" stroke-width="2.2"' if n["group"] >= 0
                else ' stroke="#14532d" stroke-width="0.6"')
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#16a34a"{ring}/>'
    if n["kind"] == "error":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#9ca3af"/>'
    if n["kind"] == "token":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#111827"/>'
    if n["kind"] == "logit":
        return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#f97316"/>'
                f'<text x="{x:.1f}" y="{y - 9:.1f}" text-anchor="middle" fill="#9a3412">'
                f'{html_text(short(shown(logit_texts[n["logit"]]), 10))}</text>')
    color = PALETTE[n["group"] % len(PALETTE)]
    return (f'<rect x="{x - 34:.1f}" y="{y - 6:.1f}" width="68" height="12" rx="4" fill="{color}"/>'
            f'<text x="{x:.1f}" y="{y + 3.5:.1f}" text-anchor="middle" fill="#fff" font-size="9">'
            f'{html_text(short(n["text"], 13))}</text>')


def _draw(session: Session, nodes: list[dict[str, Any]], a: torch.Tensor, tops: dict[int, int],
          heights: dict[int, int], width: int, height: int, max_edges: int) -> str:
    """Row bands, the strongest edges (weakest drawn first), nodes, token labels."""
    r = session.result
    L = r.graph.n_layers
    # short prompts fit the panel (scaled); long ones keep their size and scroll
    size = 'width="100%"' if width <= 1100 else f'width="{width}" height="{height}"'
    out = [f'<div class="clt-hover">hover a node for its label; click it for details</div>'
           f'<div class="clt-scroll"><svg xmlns="http://www.w3.org/2000/svg" class="clt-svg" {size} '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    for row in range(L + 2):
        label = "emb" if row == 0 else "logits" if row == L + 1 else f"L{row - 1}"
        if row % 2:
            out.append(f'<rect x="0" y="{tops[row] - 4}" width="{width}" height="{heights[row]}" fill="#f6f7f9"/>')
        out.append(f'<text x="6" y="{tops[row] + 14}" fill="#6b7280">{label}</text>')
    pos = {n["id"]: (n["x"], n["y"]) for n in nodes}
    t_idx, s_idx = a.nonzero(as_tuple=True)
    weights = a[t_idx, s_idx]
    if len(weights):
        order = weights.abs().argsort(descending=True)[:max_edges]
        biggest = float(weights.abs().max())
        ids = [n["id"] for n in nodes]
        for e in reversed(order.tolist()):
            t, s, w = int(t_idx[e]), int(s_idx[e]), float(weights[e])
            (x0, y0), (x1, y1) = pos[ids[s]], pos[ids[t]]
            rel = abs(w) / biggest
            out.append(f'<line class="edge" data-s="{html_text(ids[s])}" data-t="{html_text(ids[t])}" x1="{x0:.1f}" '
                       f'y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" stroke="{"#2563eb" if w > 0 else "#dc2626"}" '
                       f'stroke-opacity="{0.12 + 0.6 * rel:.2f}" stroke-width="{0.4 + 3.2 * rel:.2f}"/>')
    for n in nodes:
        out.append(f'<g class="node {n["kind"]}" data-node="{html_text(n["id"])}" data-label="{html_text(n["hover"])}">'
                   f'<title>{html_text(n["hover"])}</title>' + _shape(n, r.logit_texts) + "</g>")
    for c, tok in enumerate(r.tokens):
        x = LEFT + c * COL_W + COL_W / 2
        out.append(f'<text x="{x:.1f}" y="{height - 26}" text-anchor="middle" fill="#111827">'
                   f'{html_text(short(shown(tok), 11))}</text>'
                   f'<text x="{x:.1f}" y="{height - 12}" text-anchor="middle" fill="#9ca3af" font-size="9">{c}</text>')
    out.append("</svg></div>")
    return "".join(out)


GRAPH_CSS = """
.clt-scroll { overflow: auto; max-height: 680px; border: 1px solid #e5e7eb; border-radius: 6px; background: #fff; }
.clt-hover { min-height: 1.5em; font: 12px monospace; color: #374151; padding: 2px 4px; white-space: nowrap;
             overflow: hidden; text-overflow: ellipsis; }
.clt-svg [data-node] { cursor: pointer; }
.clt-svg [data-node]:hover > circle, .clt-svg [data-node]:hover > rect { stroke: #f59e0b; stroke-width: 2.5; }
.clt-svg [data-node].sel > circle, .clt-svg [data-node].sel > rect { stroke: #111827; stroke-width: 3; }
.clt-svg.focus .edge { stroke-opacity: 0.05; }
.clt-svg.focus .edge.hl { stroke-opacity: 0.9; }
"""

# Event delegation on the component root, so it keeps working when the SVG is replaced by a new trace.
GRAPH_JS = """
element.addEventListener('mouseover', (e) => {
  const n = e.target.closest('[data-node]');
  const h = element.querySelector('.clt-hover');
  if (n && h) { h.textContent = n.dataset.label; }
});
element.addEventListener('click', (e) => {
  const n = e.target.closest('[data-node]');
  if (!n) { return; }
  const svg = n.closest('svg');
  const id = n.dataset.node;
  svg.querySelectorAll('.sel').forEach((x) => x.classList.remove('sel'));
  svg.querySelectorAll('.hl').forEach((x) => x.classList.remove('hl'));
  n.classList.add('sel');
  svg.classList.add('focus');
  svg.querySelectorAll('.edge').forEach((x) => {
    if (x.dataset.s === id || x.dataset.t === id) { x.classList.add('hl'); }
  });
  trigger('click', {node: id});
});
"""
