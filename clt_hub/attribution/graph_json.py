"""Graph files for the Neuronpedia / circuit-tracer attribution-graph frontend.

Schema written (version 1; see docs/graph_json.md):
  metadata {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version}
  qParams  {pinnedIds, supernodes: [[name, node_id, ...]], linkType, clickedId, sg_pos}
  nodes    [{node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx,
             reverse_ctx_idx, jsNodeId, clerp, influence, activation}]
  links    [{source, target, weight}]   weight = direct effect of source on target
Node ids: feature "{layer}_{feature}_{pos}", error "{layer}_-1_{pos}" (upstream writes
"0_{layer}_{pos}", which collides with layer-0 features), token "E_{token_id}_{pos}", logit
"{n_layers + 1}_{token_id}_{pos}".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import (
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
from typing_extensions import TypedDict

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


@with_config(ConfigDict(extra="allow"))
class Node(TypedDict):
    """A node as read: only its id is required; upstream files carry other fields, kept as they are."""

    node_id: StrictStr


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
        return self


def _problem(error: Any, data: dict[str, Any]) -> str:
    """One pydantic error as the one line a user needs: where in the file, and what is wrong."""
    loc, kind = [str(part) for part in error["loc"]], error["type"]
    if kind == "value_error":  # the document's own checks: their message as it is
        return str(error["ctx"]["error"])
    if len(loc) == 1:
        if kind == "missing":
            return f"missing top-level {loc[0]!r}; not an attribution graph file"
        return f"{loc[0]!r} must be a JSON {'array' if kind == 'list_type' else 'object'}"
    if loc[0] == "nodes":
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


def _cantor(x: int, y: int) -> int:
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
        add(i, node_id=f"{layer}_{feat}_{pos}", feature=_cantor(layer, feat), layer=str(layer), ctx_idx=pos,
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
            supernodes: Sequence[Sequence[str]] = (), pruned: Pruned | None = None) -> dict[str, Any]:
    """The pruned graph as frontend JSON. `supernodes`: [[name, node_id, ...], ...]."""
    pruned = pruned or prune(graph, node_threshold, edge_threshold)
    records = node_records(graph, list(prompt_tokens) + list(logit_texts), clerps, pruned.cumulative)
    keep = pruned.node_mask.nonzero().squeeze(-1).tolist()
    nodes = [records[i] for i in keep]
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
    _document(document, "the graph being written")  # what is written reads back
    return document


@dataclass
class GraphFile:
    """A graph JSON read back: nodes by id and a sparse edge list (what the frontend holds)."""

    metadata: dict[str, Any]
    qparams: dict[str, Any]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: list[tuple[str, str, float]] = field(default_factory=list)

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
    return gf
