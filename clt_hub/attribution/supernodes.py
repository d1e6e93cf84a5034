"""Supernodes: named groups of features, and an automatic grouping suggestion.

The suggestion groups kept features whose effects look alike: cosine similarity of their
outgoing-edge profiles (which kept nodes they drive, and how strongly) above `min_similarity`,
merged transitively. Features that play the same role in the circuit (several "Texas" features
feeding the same "say Austin" features) end up together; the user renames or edits groups.
"""

from __future__ import annotations

import torch

from clt_hub.attribution.graph import Graph
from clt_hub.attribution.pruning import Pruned


def feature_node_ids(graph: Graph) -> list[str]:
    return [f"{l}_{f}_{p}" for l, p, f in graph.features.tolist()]


def suggest(graph: Graph, pruned: Pruned, min_similarity: float = 0.9, labels: dict[str, str] | None = None
            ) -> list[list[str]]:
    """[[name, node_id, ...], ...] for groups of two or more kept features (qParams.supernodes)."""
    if not 0.0 < min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
    nf = graph.n_features
    kept = pruned.node_mask[:nf].nonzero().squeeze(-1)
    if len(kept) < 2:
        return []
    rows = pruned.node_mask[graph.row_nodes].nonzero().squeeze(-1)  # kept nodes that have inputs
    out_edges = (graph.rows[rows][:, kept] * pruned.edges[rows][:, kept]).T  # [k, n_targets]
    norms = out_edges.norm(dim=1, keepdim=True)
    profile = out_edges / norms.clamp(min=1e-12)
    sim = profile @ profile.T
    has_out = norms.squeeze(1) > 0
    parent = list(range(len(kept)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = ((sim >= min_similarity) & has_out[:, None] & has_out[None, :]).triu(1).nonzero().tolist()
    for i, j in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(kept)):
        groups.setdefault(find(i), []).append(i)
    ids = feature_node_ids(graph)
    labels = labels or {}
    result: list[list[str]] = []
    for members in sorted((m for m in groups.values() if len(m) > 1), key=len, reverse=True):
        node_ids = [ids[int(kept[m])] for m in members]
        named = [labels[n] for n in node_ids if labels.get(n)]
        # the most common label (ties: the first in sorted order, so names do not change from run to run)
        name = max(sorted(set(named)), key=named.count) if named else f"group {len(result) + 1}"
        result.append([name, *node_ids])
    return result


def collapse(adjacency: torch.Tensor, groups: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    """Adjacency with each group of node indices merged into one node (edges summed): the view a
    frontend shows once supernodes are formed. Returns the new matrix and its node index lists."""
    n = adjacency.shape[0]
    in_group = {i for g in groups for i in g}
    members = [g for g in groups] + [[i] for i in range(n) if i not in in_group]
    m = torch.zeros(len(members), n, dtype=adjacency.dtype)
    for row, idx in enumerate(members):
        m[row, idx] = 1
    return m @ adjacency @ m.T, members


def _small_int(text: str) -> bool:
    """Digits int() reads, at most 18 of them: "²".isdigit() is true but int("²") fails, and int() refuses more
    than 4,300 digits; both were raw ValueErrors."""
    return text.isdecimal() and len(text) <= 18


def find_supernode(names: list[str], query: str) -> str:
    """The supernode `query` names: its exact name, its number in the list (1, 2, ...), or the start of its
    name when only one name starts so (case-insensitive). Generated names are long; nobody should have to
    type one whole."""
    if query in names:
        return query
    q = query.strip()
    if _small_int(q) and 1 <= int(q) <= len(names):
        return names[int(q) - 1]
    starts = [n for n in names if n.lower().startswith(q.lower())] if q else []
    if len(starts) == 1:
        return starts[0]
    from clt_hub.errors import ConfigError

    listed = ", ".join(f"{i}: {n!r}" for i, n in enumerate(names, 1)) or "none"
    what = f"{len(starts)} supernodes start with {query!r}" if len(starts) > 1 else f"no supernode named {query!r}"
    raise ConfigError(f"{what}; give a name, its start or its number. The graph has: {listed}")


def interventions_for(supernodes: list[list[str]], name: str, *, value: float | None = None,
                      scale: float | None = None) -> list:
    """The feature interventions that set or scale every member of supernode `name` at its position.

    `supernodes` is graph JSON's qParams.supernodes ([[name, "layer_feature_pos", ...], ...])."""
    from clt_hub.attribution.interventions import Intervention
    from clt_hub.errors import ConfigError

    groups = {g[0]: g[1:] for g in supernodes if g}
    name = find_supernode(list(groups), name)
    out = []
    for node_id in groups[name]:
        parts = node_id.split("_")
        if len(parts) != 3 or not all(_small_int(p.removeprefix("-")) for p in parts) or int(parts[1]) < 0:
            raise ConfigError(f"supernode {name!r} member {node_id!r} is not a feature node id (layer_feature_pos)")
        layer, feature, pos = (int(p) for p in parts)
        out.append(Intervention(layer, feature, pos, value=value, scale=scale))
    return out
