"""A static picture of a pruned attribution graph: nodes by (token position, layer), edges by weight,
supernodes drawn as labelled boxes. For reports and the case studies; the Space draws its own."""

from __future__ import annotations

from pathlib import Path

import torch

from clt_hub.attribution.graph import Graph
from clt_hub.attribution.pruning import Pruned


def plot_graph(graph: Graph, pruned: Pruned, tokens: list[str], path: str | Path,
               supernodes: dict[str, list[int]] | None = None, title: str = "", max_edges: int = 300) -> Path | None:
    """PNG of the kept nodes and strongest kept edges; `supernodes`: name -> node indices."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    L, T = graph.n_layers, graph.n_pos
    kept = pruned.node_mask.nonzero().squeeze(-1).tolist()

    def where(i: int) -> tuple[float, float] | None:
        if i < graph.n_features:
            l, p, _ = graph.features[i].tolist()
            return p + 0.15 * ((i % 5) - 2) / 2, l + 1
        if i < graph.token_index(0):
            l, p = divmod(i - graph.n_features, T)
            return p + 0.3, l + 1.3
        if i < graph.logit_index(0):
            return i - graph.token_index(0), 0
        return T - 1 + 0.25 * ((i - graph.logit_index(0)) - graph.n_logits / 2), L + 1.2

    pos = {i: where(i) for i in kept}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * T + 2), 1.2 * L + 3))
    edges = (graph.adjacency * pruned.edge_mask).abs()
    flat = edges.flatten()
    k = min(max_edges, int((flat > 0).sum()))
    if k:
        top = flat.topk(k).indices
        scale = float(flat[top[0]])
        for idx in top.tolist():
            t, s = divmod(idx, edges.shape[1])
            if s in pos and t in pos:
                sign = graph.adjacency[t, s] > 0
                (x0, y0), (x1, y1) = pos[s], pos[t]  # type: ignore[misc]
                ax.plot([x0, x1], [y0, y1], color="tab:blue" if sign else "tab:red",
                        alpha=0.15 + 0.6 * float(flat[idx]) / scale, lw=0.5 + 2.5 * float(flat[idx]) / scale, zorder=1)
    colors = {"feature": "tab:green", "error": "lightgray", "token": "black", "logit": "tab:orange"}
    for i, xy in pos.items():
        assert xy is not None
        kind = ("feature" if i < graph.n_features else "error" if i < graph.token_index(0) else
                "token" if i < graph.logit_index(0) else "logit")
        ax.scatter(xy[0], xy[1], s=40 if kind == "feature" else 25, color=colors[kind], marker="s" if kind == "error" else "o",
                   zorder=2)
        if kind == "logit":
            ax.annotate(f"{graph.logit_tokens[i - graph.logit_index(0)].item()}", xy, fontsize=7)
    for n, (name, members) in enumerate((supernodes or {}).items()):
        pts = torch.tensor([pos[m] for m in members if m in pos])
        if not len(pts):
            continue
        (x0, y0), (x1, y1) = pts.min(0).values.tolist(), pts.max(0).values.tolist()
        color = plt.get_cmap("tab10")(n % 10)
        ax.add_patch(plt.Rectangle((x0 - 0.2, y0 - 0.2), x1 - x0 + 0.4, y1 - y0 + 0.4, fill=False, ec=color, lw=2,
                                   zorder=3))
        ax.annotate(name, (x0 - 0.2, y1 + 0.25), color=color, fontsize=9, weight="bold")
    ax.set_xticks(range(T))
    ax.set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(L + 2))
    ax.set_yticklabels(["emb"] + [f"L{l}" for l in range(L)] + ["logit"])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
