"""Figures: KL and logit difference recovered against sparsity per method, and one circuit drawn by layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clt_hub.circuits.components import ComponentGraph

COLOURS = {"q": "tab:blue", "k": "tab:green", "v": "tab:red", "mlp": "tab:purple", "logits": "black"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_pair(fig: Any, axes: tuple[Any, Any], path: str | Path, title: str) -> Path:
    """Grid, legends and title on a two-panel figure, saved and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_curves(rows: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = "") -> Path:
    """rows: method -> metrics per sparsity (dicts with sparsity, kl, logit_diff_recovered, edges_kept)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, rs in rows.items():
        rs = sorted(rs, key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in rs]
        a.plot(xs, [max(r["kl"], 1e-6) for r in rs], marker="o", label=method)
        b.plot(xs, [r["logit_diff_recovered"] for r in rs], marker="o", label=method)
    a.set(xlabel="edge sparsity (fraction removed)", ylabel="KL(full || circuit), nats", yscale="log",
          title="faithfulness (lower is better)")
    b.set(xlabel="edge sparsity (fraction removed)", ylabel="logit difference recovered",
          title="task metric (1 = full model)")
    b.axhline(1.0, color="grey", lw=0.5)
    return _save_pair(fig, (a, b), path, title)


def plot_training(rows: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Edge Pruning's training curves per target sparsity (rows with `train_history`: [step, kl, expected
    sparsity]): whether the gates reached the target and the KL settled is what says the run converged."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in rows:
        steps, kl, sp = zip(*r["train_history"], strict=True)
        a.plot(steps, [max(k, 1e-6) for k in kl], lw=0.8, label=f"target {r['sparsity_target']:g}")
        b.plot(steps, sp, lw=0.8, label=f"target {r['sparsity_target']:g}")
        b.axhline(r["sparsity_target"], color="grey", lw=0.5, ls="--")
    a.set(xlabel="step", ylabel="KL(full || circuit) on the batch, nats", yscale="log", title="training KL")
    b.set(xlabel="step", ylabel="expected edge sparsity", title="gates (dashed: target)")
    return _save_pair(fig, (a, b), path, title)


class _Layout:
    """Where each component sits: the embedding at the bottom, each layer's heads then its MLP in a row, the
    logits on top; a head's q, k and v inputs just below it (k/v of a key/value group at its first query head)."""

    def __init__(self, graph: ComponentGraph):
        self.graph, self.H = graph, graph.n_heads

    def pos(self, kind: str, layer: int, head: int | None) -> tuple[float, float]:
        H, g = self.H, self.graph
        if kind == "embed":
            return (H / 2, 0.0)
        if kind == "logits":
            return (H / 2, 2.0 * g.n_layers + 1)
        if kind == "mlp":  # a column of its own, right of the heads, just above its layer's heads
            return (float(H) + 0.5, 2.0 * layer + 1.6)
        return (float(head or 0), 2.0 * layer + 1)

    def head_of(self, node: Any) -> int | None:
        return node.head if node.kind == "q" else (node.head or 0) * (self.H // self.graph.n_kv_heads)

    def reader(self, r: int) -> tuple[float, float]:
        node = self.graph.readers[r]
        if node.kind in ("q", "k", "v"):
            x, y = self.pos("head", node.layer, self.head_of(node))
            return (x + {"q": -0.15, "k": 0.0, "v": 0.15}[node.kind], y - 0.25)
        return self.pos(node.kind, node.layer, None)

    def shown(self, edges: Sequence[tuple[int, int]]) -> set[tuple[str, int, int | None]]:
        """The components on a drawn edge: (kind, layer, head)."""
        out = {(self.graph.writers[w].kind, self.graph.writers[w].layer, self.graph.writers[w].head)
               for w, _ in edges}
        for _, r in edges:
            n = self.graph.readers[r]
            out.add(("head", n.layer, self.head_of(n)) if n.kind in ("q", "k", "v") else (n.kind, n.layer, None))
        return out


def plot_circuit(graph: ComponentGraph, edges: Sequence[tuple[int, int]], path: str | Path, title: str = "",
                 max_edges: int = 150) -> Path:
    """The kept edges (writer index, reader index), strongest first, between components placed by layer (see
    _Layout). Edge colour: the reader's input (q, k, v, MLP, logits); components on no drawn edge are left out.
    Only the first `max_edges` are drawn (the title says so); the JSON export has them all."""
    from matplotlib.collections import LineCollection

    plt = _plt()
    total = len(edges)
    edges = list(edges)[:max_edges]
    layout, H = _Layout(graph), graph.n_heads
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * H + 3), max(4, 0.5 * graph.n_layers + 2)))
    segments = [[layout.pos(graph.writers[w].kind, graph.writers[w].layer, graph.writers[w].head),
                 layout.reader(r)] for w, r in edges]
    colours = [COLOURS[graph.readers[r].kind] for _, r in edges]
    ax.add_collection(LineCollection(segments, colors=colours, linewidths=0.8, alpha=0.6))
    for kind, layer, head in layout.shown(edges):
        x, y = layout.pos(kind, layer, head)
        label = {"embed": "embed", "logits": "logits", "mlp": f"m{layer}"}.get(kind, f"a{layer}.h{head}")
        ax.scatter([x], [y], s=260, color="white", edgecolor="black", zorder=3)
        ax.text(x, y, label, ha="center", va="center", fontsize=6, zorder=4)
    for kind, colour in COLOURS.items():
        ax.plot([], [], color=colour, label=f"into {kind}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xlim(-1, H + 1.5)
    ax.set_ylim(-0.7, 2 * graph.n_layers + 1.7)
    ax.set_yticks([0] + [2 * l + 1 for l in range(graph.n_layers)] + [2 * graph.n_layers + 1],
                  ["embed"] + [f"layer {l}" for l in range(graph.n_layers)] + ["logits"], fontsize=6)
    ax.set_xticks([])
    shown_note = f" (strongest {len(edges)} drawn)" if total > len(edges) else ""
    ax.set_title((title or f"{total} edges") + shown_note, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
