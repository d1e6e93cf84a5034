"""A static picture of a pruned attribution graph, for reports, `clt-hub trace` and the case studies (the
Space draws its own, clickable one).

Nodes sit by token position (columns) and layer (rows): features of one (layer, position) cell side by side
in a small grid, error nodes as grey squares, tokens at the bottom, output logits at the top with their
words. Edges are blue (excitatory) or red (inhibitory), wider for larger weights. A supernode is marked by
a coloured ring on each of its members (never a box, which would also enclose nodes outside the group).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from clt_hub.attribution.graph import Graph
from clt_hub.attribution.pruning import Pruned

COLORS = {"feature": "#16a34a", "error": "#9ca3af", "token": "#111827", "logit": "#f97316"}
CELL_COLUMNS = 4  # features of one (layer, position) per row of the cell's grid


def _kind(graph: Graph, i: int) -> str:
    if i < graph.n_features:
        return "feature"
    if i < graph.token_index(0):
        return "error"
    return "token" if i < graph.logit_index(0) else "logit"


def _positions(graph: Graph, kept: list[int]) -> dict[int, tuple[float, float]]:
    """x = token position, y = layer + 1 (tokens at 0, logits on top); each cell's features in a grid."""
    L, T = graph.n_layers, graph.n_pos
    cells: dict[tuple[int, int], list[int]] = {}
    pos: dict[int, tuple[float, float]] = {}
    for i in kept:
        kind = _kind(graph, i)
        if kind == "feature":
            l, p, _ = graph.features[i].tolist()
            cells.setdefault((l, p), []).append(i)
        elif kind == "error":
            l, p = divmod(i - graph.n_features, T)
            pos[i] = (p + 0.38, l + 1.0)
        elif kind == "token":
            pos[i] = (float(i - graph.token_index(0)), 0.0)
        else:
            j = i - graph.logit_index(0)
            pos[i] = (T - 1 + 0.5 * (j - (graph.n_logits - 1) / 2), L + 1.0)
    for (l, p), members in cells.items():
        # a grid inside the cell (0.75 of a column wide, 0.7 of a layer high), wider as the cell fills up
        cols = max(CELL_COLUMNS, math.ceil(math.sqrt(1.5 * len(members))))
        rows = math.ceil(len(members) / cols)
        step_x, step_y = min(0.13, 0.75 / cols), min(0.16, 0.7 / rows)
        for k, i in enumerate(members):
            r, c = divmod(k, cols)
            width = min(cols, len(members) - r * cols)
            pos[i] = (p - 0.08 + (c - (width - 1) / 2) * step_x, l + 1.0 + (r - (rows - 1) / 2) * step_y)
    return pos


def _edges(ax: Any, graph: Graph, pruned: Pruned, pos: dict[int, tuple[float, float]], max_edges: int) -> None:
    targets, sources, weights = pruned.kept_edges(graph)
    k = min(max_edges, int((weights != 0).sum()))
    if not k:
        return
    top = weights.abs().topk(k).indices
    scale = float(weights[top[0]].abs())
    for e in reversed(top.tolist()):  # strongest drawn last, on top
        t, s, w = int(targets[e]), int(sources[e]), float(weights[e])
        if s in pos and t in pos:
            rel = abs(w) / scale
            (x0, y0), (x1, y1) = pos[s], pos[t]
            ax.plot([x0, x1], [y0, y1], color="#2563eb" if w > 0 else "#dc2626",
                    alpha=0.12 + 0.6 * rel, lw=0.4 + 2.6 * rel, zorder=1)


def _legend(ax: Any, plt: Any, groups: list[tuple[str, Any]]) -> None:
    from matplotlib.lines import Line2D

    marks = [Line2D([], [], ls="", marker="o", color=COLORS["feature"], label="feature"),
             Line2D([], [], ls="", marker="s", color=COLORS["error"], label="MLP error"),
             Line2D([], [], ls="", marker="o", color=COLORS["token"], label="token"),
             Line2D([], [], ls="", marker="o", color=COLORS["logit"], label="output"),
             Line2D([], [], color="#2563eb", label="edge +"), Line2D([], [], color="#dc2626", label="edge −")]
    marks += [Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgewidth=2, markersize=9,
                     color=color, label=name) for name, color in groups]
    ax.legend(handles=marks, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def plot_graph(graph: Graph, pruned: Pruned, tokens: list[str], path: str | Path,
               supernodes: dict[str, list[int]] | None = None, title: str = "", max_edges: int = 300,
               logit_texts: list[str] | None = None) -> Path | None:
    """PNG of the kept nodes and strongest kept edges. `supernodes`: name -> node indices (rings on the
    members); `logit_texts`: the output nodes' words (token ids otherwise). None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    L, T = graph.n_layers, graph.n_pos
    kept = pruned.node_mask.nonzero().squeeze(-1).tolist()
    pos = _positions(graph, kept)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * T + 4.0), 1.1 * L + 3.0))
    _edges(ax, graph, pruned, pos, max_edges)
    for i, (x, y) in pos.items():
        kind = _kind(graph, i)
        ax.scatter(x, y, s=36 if kind != "error" else 24, color=COLORS[kind], marker="s" if kind == "error" else "o",
                   zorder=2, linewidths=0)
        if kind == "logit":
            j = i - graph.logit_index(0)
            word = logit_texts[j] if logit_texts and j < len(logit_texts) else str(int(graph.logit_tokens[j]))
            ax.annotate(repr(word)[1:-1], (x, y), xytext=(0, 6), textcoords="offset points", ha="center",
                        fontsize=8, color="#9a3412")
    groups = []
    for n, (name, members) in enumerate((supernodes or {}).items()):
        color = plt.get_cmap("tab10")(n % 10)
        shown = [pos[m] for m in members if m in pos]
        for x, y in shown:
            ax.scatter(x, y, s=130, facecolors="none", edgecolors=[color], linewidths=2, zorder=3)
        if shown:
            groups.append((f"{name} ({len(shown)})", color))
    _legend(ax, plt, groups)
    ax.set_xticks(range(T))
    ax.set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L + 2))
    ax.set_yticklabels(["tokens"] + [f"L{l}" for l in range(L)] + ["outputs"])
    ax.set_xlim(-0.7, T - 0.3 + 0.25 * max(0, graph.n_logits - 2))
    ax.set_ylim(-0.6, L + 1.6)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
