"""Graph files for the Neuronpedia / circuit-tracer attribution-graph frontend.

Schema written (version 1; see docs/graph_json.md):
  metadata {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version}
  qParams  {pinnedIds, supernodes: [[name, node_id, ...]], linkType, clickedId, sg_pos}
  nodes    [{node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx,
             reverse_ctx_idx, jsNodeId, clerp, influence, activation}]
  links    [{source, target, weight}]   weight = direct effect of source on target
  with QK tracing (clt-hub trace --qk N; clt_hub.attribution.qk), as Neuronpedia's graph schema has it:
  nodes[i].qk_tracing_results {pair_wise_contributors: [[q_id, k_id, value]], top_q_marginal_contributors:
             [[q_id, value]], top_k_marginal_contributors: [[k_id, value]]}, nodes[i].qk_head (ours: which
             head, query and key), qk_only_nodes {node_id: descriptor} for contributors that are not nodes
Node ids: feature "{layer}_{feature}_{pos}", error "{layer}_-1_{pos}" (upstream writes
"0_{layer}_{pos}", which collides with layer-0 features), token "E_{token_id}_{pos}", logit
"{n_layers + 1}_{token_id}_{pos}".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
    with_config,
)
from typing_extensions import NotRequired, TypedDict

from clt_hub.attribution.graph import Graph
from clt_hub.attribution.options import TraceOptions
from clt_hub.attribution.pruning import Pruned, prune
from clt_hub.config import load_json
from clt_hub.errors import ArtifactError

SCHEMA_VERSION = 1

# The schema, declared once with pydantic: what `to_json` writes is validated by the same types `load` reads
# with, so every file written reads back. Readers are lenient where upstream files differ (fields of their own
# are kept as they are) and strict where a wrong value would mislead (ids, weights, supernodes). Nodes and links
# are TypedDicts, not models: a graph has up to hundreds of thousands of links, and validating plain dicts is
# about 10x faster than building a model object for each.
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # not a bool, a string or an infinity


def _row(width: int) -> Callable[[list[Any]], list[Any]]:
    """A QK contributor row: `width - 1` node ids, then a finite number (JSON arrays, kept as lists)."""
    shape = ", ".join(["node_id"] * (width - 1) + ["value"])

    def check(row: list[Any]) -> list[Any]:
        value = row[-1] if row else None
        if len(row) != width or not all(isinstance(x, str) for x in row[:-1]) or isinstance(value, bool) \
                or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"a row is [{shape}] with a finite value, not {row!r}")
        return row
    return check


@with_config(ConfigDict(extra="allow"))
class QKTracingResults(TypedDict):
    """Why a head attends where it does, on the node it explains (Neuronpedia's graph-schema.json): the largest
    pairwise (query writer, key writer) terms of the pre-softmax score and the largest marginals of each side."""

    pair_wise_contributors: list[Annotated[list[Any], AfterValidator(_row(3))]]
    top_q_marginal_contributors: list[Annotated[list[Any], AfterValidator(_row(2))]]
    top_k_marginal_contributors: list[Annotated[list[Any], AfterValidator(_row(2))]]


@with_config(ConfigDict(extra="forbid"))
class QKHead(TypedDict):
    """clt_hub's own: which score a node's qk_tracing_results split (docs/qk_attribution.md)."""

    layer: StrictInt
    head: StrictInt
    query: StrictInt
    key: StrictInt
    score: FiniteNumber       # the pre-softmax score, q . k x scaling: the sum of all pairwise terms
    attention: FiniteNumber   # the real attention weight of the head from query to key
    influence: FiniteNumber   # the kept cross-position influence the head carries from key to query
    into_node: FiniteNumber   # the part of it that goes into this node


@with_config(ConfigDict(extra="allow"))
class QKOnlyNode(TypedDict):
    """A QK contributor that is not a node of the graph (graph-schema.json's `qk_only_nodes` entries)."""

    node_id: StrictStr
    feature: NotRequired[StrictInt | None]
    layer: StrictStr | StrictInt
    ctx_idx: StrictInt
    feature_type: StrictStr
    jsNodeId: StrictStr
    clerp: StrictStr
    activation: NotRequired[FiniteNumber | None]


@with_config(ConfigDict(extra="allow"))
class Node(TypedDict):
    """A node as read: only its id is required; upstream files carry other fields, kept as they are."""

    node_id: StrictStr
    qk_tracing_results: NotRequired[QKTracingResults]
    qk_head: NotRequired[QKHead]


@with_config(ConfigDict(extra="forbid"))
class NodeRecord(TypedDict):
    """A node as clt_hub writes it (docs/graph_json.md)."""

    node_id: StrictStr
    feature: StrictInt
    layer: StrictStr
    ctx_idx: StrictInt
    feature_type: StrictStr
    token_prob: FiniteNumber
    is_target_logit: bool
    run_idx: StrictInt
    reverse_ctx_idx: StrictInt
    jsNodeId: StrictStr
    clerp: StrictStr
    influence: FiniteNumber | None
    activation: FiniteNumber | None


NODE_FIELDS = tuple(NodeRecord.__annotations__)
_RECORDS = TypeAdapter(list[NodeRecord])


class Link(TypedDict):
    source: StrictStr
    target: StrictStr
    weight: FiniteNumber  # the direct effect of source on target


Supernode = Annotated[list[StrictStr], Field(min_length=1)]  # [name, node_id, ...]


class QParams(BaseModel):
    model_config = ConfigDict(extra="allow")  # the frontend's view state: pinnedIds, linkType, clickedId, sg_pos
    supernodes: list[Supernode] = Field(default_factory=list)


class Metadata(BaseModel):
    """What clt_hub writes under `metadata` (read back as any JSON object: upstream metadata differ)."""

    slug: StrictStr
    scan: StrictStr
    transcoder_list: list[StrictStr]
    prompt_tokens: list[StrictStr]
    prompt: StrictStr
    node_threshold: FiniteNumber
    schema_version: StrictInt = SCHEMA_VERSION


class GraphDocument(BaseModel):
    """A whole graph file: node ids unique, every link between known nodes."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    metadata: dict[str, Any]
    qparams: QParams = Field(default_factory=QParams, alias="qParams")
    nodes: list[Node]
    links: list[Link]
    qk_only_nodes: dict[StrictStr, QKOnlyNode] | None = None

    @model_validator(mode="after")
    def _ids_resolve(self) -> GraphDocument:
        seen: set[str] = set()
        for node in self.nodes:
            if node["node_id"] in seen:
                raise ValueError(f"duplicate node_id {node['node_id']!r} (upstream error ids collide with layer-0 "
                                 "features; re-export the graph with clt_hub)")
            seen.add(node["node_id"])
        for n, link in enumerate(self.links):
            if link["source"] not in seen or link["target"] not in seen:
                raise ValueError(f"link {n} ({link['source']!r} -> {link['target']!r}) names an unknown node")
        _qk_ids_resolve(self.nodes, self.qk_only_nodes or {}, seen)
        return self


def _qk_ids_resolve(nodes: list[Node], only: dict[str, QKOnlyNode], seen: set[str]) -> None:
    """Every QK contributor is a node or in qk_only_nodes (as graph-schema.json promises), and qk_only_nodes
    holds no node of the graph, each under its own id."""
    for key, descriptor in only.items():
        if descriptor["node_id"] != key:
            raise ValueError(f"qk_only_nodes[{key!r}] has node_id {descriptor['node_id']!r}; key each by its id")
        if key in seen:
            raise ValueError(f"qk_only_nodes[{key!r}] is a node of the graph; qk_only_nodes holds only others")
    for node in nodes:
        results: Any = node.get("qk_tracing_results") or {}
        for rows in results.values():
            for row in rows:
                unknown = [i for i in row[:-1] if i not in seen and i not in only]
                if unknown:
                    raise ValueError(f"node {node['node_id']!r}'s qk_tracing_results names {unknown[0]!r}, which is "
                                     "neither a node nor in qk_only_nodes")


def _problem(error: Any, data: dict[str, Any]) -> str:
    """One pydantic error as the one line a user needs: where in the file, and what is wrong."""
    loc, kind = [str(part) for part in error["loc"]], error["type"]
    if kind == "value_error":  # the document's own checks (their message as it is) or a QK row's, where it is
        return f"{'.'.join(loc)}: {error['ctx']['error']}" if loc else str(error["ctx"]["error"])
    if len(loc) == 1:
        if kind == "missing":
            return f"missing top-level {loc[0]!r}; not an attribution graph file"
        return f"{loc[0]!r} must be a JSON {'array' if kind == 'list_type' else 'object'}"
    if loc[0] == "nodes" and (len(loc) == 2 or loc[2] == "node_id"):
        return f"node {loc[1]} has no string node_id"
    if loc[0] == "links":
        n = int(loc[1])
        if kind == "missing" or len(loc) == 2:
            return f"link {n} needs source, target and weight"
        link = data["links"][n]
        if loc[2] == "weight":
            return f"link {n} ({link['source']} -> {link['target']}) has weight {link['weight']!r}, not a finite number"
        return f"link {n} ({link['source']!r} -> {link['target']!r}) names an unknown node"
    if loc[:2] == ["qParams", "supernodes"]:
        return "qParams.supernodes must be a list of [name, node_id, ...] lists of strings"
    return f"{'.'.join(loc)}: {error['msg']}"


def _document(data: Any, where: str) -> GraphDocument:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: the top level is a JSON {type(data).__name__}, not an object")
    try:
        return GraphDocument.model_validate(data)
    except ValidationError as e:
        raise ArtifactError(f"{where}: {_problem(e.errors(include_url=False)[0], data)}") from None


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_records(graph: Graph, tokens: Sequence[str], clerps: dict[str, str] | None = None,
                 influence: torch.Tensor | None = None) -> list[NodeRecord]:
    """One record per node of the graph, in node order."""
    clerps = clerps or {}
    ids = graph.input_ids.tolist()
    out: list[dict[str, Any]] = []

    def add(i: int, **rec: Any) -> None:
        rec.setdefault("token_prob", 0.0)
        rec.setdefault("is_target_logit", False)
        rec.setdefault("activation", None)
        rec.update(run_idx=0, reverse_ctx_idx=0, influence=None if influence is None else float(influence[i]))
        rec.setdefault("clerp", clerps.get(rec["node_id"], ""))
        out.append({k: rec[k] for k in NODE_FIELDS})

    for i, (layer, pos, feat) in enumerate(graph.features.tolist()):
        add(i, node_id=f"{layer}_{feat}_{pos}", feature=cantor(layer, feat), layer=str(layer), ctx_idx=pos,
            feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feat}-0",
            activation=float(graph.activations[i]))
    for layer in range(graph.n_layers):
        for pos in range(graph.n_pos):
            add(graph.error_index(layer, pos), node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer),
                ctx_idx=pos, feature_type="mlp reconstruction error", jsNodeId=f"{layer}_-1_{pos}-0")
    for pos, tok in enumerate(ids):
        add(graph.token_index(pos), node_id=f"E_{tok}_{pos}", feature=pos, layer="E", ctx_idx=pos,
            feature_type="embedding", jsNodeId=f"E_{tok}-{pos}")
    last = graph.n_pos - 1
    for j, (tok, p) in enumerate(zip(graph.logit_tokens.tolist(), graph.logit_probabilities.tolist(), strict=True)):
        text = tokens[len(ids) + j] if len(tokens) > len(ids) + j else str(tok)
        if tok < 0:  # a custom target (logit difference, direction): ids -1, -2, ... never collide
            tok = -1 - j
        add(graph.logit_index(j), node_id=f"{graph.n_layers + 1}_{tok}_{last}", feature=tok,
            layer=str(graph.n_layers + 1), ctx_idx=last, feature_type="logit", token_prob=float(p),
            is_target_logit=(j == 0), jsNodeId=f"L_{tok}-{last}", clerp=f'Output "{text}" (p={p:.3f})')
    return _RECORDS.validate_python(out)


def to_json(graph: Graph, prompt_tokens: Sequence[str], *, prompt: str = "", slug: str = "clt-hub-graph",
            scan: str = "clt-hub", transcoder_list: Sequence[str] = (),
            node_threshold: float = TraceOptions.node_threshold, edge_threshold: float = TraceOptions.edge_threshold,
            logit_texts: Sequence[str] = (), clerps: dict[str, str] | None = None,
            supernodes: Sequence[Sequence[str]] = (), pruned: Pruned | None = None,
            qk: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pruned graph as frontend JSON. `supernodes`: [[name, node_id, ...], ...]. `qk`: QK tracing results
    from `clt_hub.attribution.qk.qk_json` ({"nodes": {node_id: fields}, "qk_only_nodes": {...}}), put on their
    nodes and, where any, under `qk_only_nodes`; without it the document has neither."""
    pruned = pruned or prune(graph, node_threshold, edge_threshold)
    records = node_records(graph, list(prompt_tokens) + list(logit_texts), clerps, pruned.cumulative)
    keep = pruned.node_mask.nonzero().squeeze(-1).tolist()
    nodes: list[dict[str, Any]] = [dict(records[i]) for i in keep]
    kept_ids = {records[i]["node_id"] for i in keep}
    for group in supernodes:
        missing = [n for n in group[1:] if n not in kept_ids]
        if missing:
            raise ValueError(f"supernode {group[0]!r} names nodes not in the pruned graph: {', '.join(missing)}")
    t_idx, s_idx, weights = pruned.kept_edges(graph)
    links = [{"source": records[s]["node_id"], "target": records[t]["node_id"], "weight": w}
             for t, s, w in zip(t_idx.tolist(), s_idx.tolist(), weights.tolist(), strict=True)]
    document = {
        "metadata": Metadata(slug=slug, scan=scan, transcoder_list=list(transcoder_list),
                             prompt_tokens=list(prompt_tokens), prompt=prompt,
                             node_threshold=node_threshold).model_dump(),
        "qParams": {"pinnedIds": [], "supernodes": [list(g) for g in supernodes], "linkType": "both",
                    "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
    if qk:
        _add_qk(document, qk)
    _document(document, "the graph being written")  # what is written reads back
    return document


def _add_qk(document: dict[str, Any], qk: dict[str, Any]) -> None:
    """QK tracing results onto the nodes they explain, and the contributors that are not nodes beside them."""
    by_id = {node["node_id"]: node for node in document["nodes"]}
    missing = [n for n in qk["nodes"] if n not in by_id]
    if missing:
        raise ValueError(f"QK tracing results are for nodes not in the pruned graph: {', '.join(missing)}")
    for node_id, fields in qk["nodes"].items():
        by_id[node_id].update(fields)
    if qk["qk_only_nodes"]:
        document["qk_only_nodes"] = qk["qk_only_nodes"]


@dataclass
class GraphFile:
    """A graph JSON read back: nodes by id and a sparse edge list (what the frontend holds)."""

    metadata: dict[str, Any]
    qparams: dict[str, Any]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: list[tuple[str, str, float]] = field(default_factory=list)
    qk_only_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # QK contributors that are not nodes

    def adjacency(self) -> tuple[list[str], torch.Tensor]:
        order = list(self.nodes)
        index = {n: i for i, n in enumerate(order)}
        adj = torch.zeros(len(order), len(order))
        for s, t, w in self.links:
            adj[index[t], index[s]] = w
        return order, adj


def save(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


MAX_GRAPH_BYTES = 1 << 30


def load(path_or_data: str | os.PathLike[str] | dict[str, Any]) -> GraphFile:
    """Read our files and circuit-tracer/Neuronpedia ones (upstream error ids are accepted too). Anything
    malformed, including a non-finite weight, is one ArtifactError naming the file and the problem."""
    if isinstance(path_or_data, dict):
        data, where = path_or_data, "graph"
    else:
        where = str(path_or_data)
        data = load_json(Path(path_or_data), what="graph JSON file", max_bytes=MAX_GRAPH_BYTES, error=ArtifactError,
                         fix="export the graph again (clt-hub trace) or fix the file")
    doc = _document(data, where)
    gf = GraphFile(metadata=doc.metadata, qparams=doc.qparams.model_dump())
    gf.nodes = {node["node_id"]: dict(node) for node in doc.nodes}
    gf.links = [(link["source"], link["target"], link["weight"]) for link in doc.links]
    gf.qk_only_nodes = {k: dict(v) for k, v in (doc.qk_only_nodes or {}).items()}
    return gf
