"""Writes tests/data/organism_graph.{json,safetensors}: the organism's graph for one fixed prompt, the
reference `test_organism_graph_regression` compares against. Rerun only when a change is meant to alter
graphs, and say why in the commit: `python tests/make_organism_graph_reference.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(__file__).parent / "data"
PROMPT = "fact : the capital of the state containing Dallas is"


def organism_graph() -> dict:
    """Everything the regression test pins, computed with the library as it is now."""
    from clt_hub.attribution.graph_json import to_json
    from clt_hub.attribution.pruning import prune, scores
    from paper_cases.common import load_subject, trace

    subject = load_subject()
    t = trace(subject, PROMPT)
    g = t.graph
    pruned = prune(g, 0.8, 0.98)
    data = to_json(g, subject.tokens(t.ids), prompt=PROMPT, pruned=pruned)
    s = scores(g)
    t_idx, s_idx = pruned.edge_mask.nonzero(as_tuple=True)
    return {
        "features": g.features.clone(), "activations": g.activations.clone(), "values": g.values.clone(),
        "constants": g.constants.clone(), "logit_tokens": g.logit_tokens.clone(),
        "edge_targets": t_idx.clone(), "edge_sources": s_idx.clone(), "edge_weights": g.adjacency[t_idx, s_idx].clone(),
        "row_sums": g.adjacency.sum(1).clone(),
        "node_ids": [n["node_id"] for n in data["nodes"]],
        "scores": [s.replacement, s.completeness],
    }


def main() -> None:
    ref = organism_graph()
    DATA.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items() if isinstance(v, torch.Tensor)},
              str(DATA / "organism_graph.safetensors"))
    (DATA / "organism_graph.json").write_text(json.dumps(
        {"prompt": PROMPT, "node_ids": ref["node_ids"], "scores": ref["scores"]}, indent=1) + "\n")
    print(f"{len(ref['features'])} active features, {len(ref['node_ids'])} kept nodes, "
          f"{len(ref['edge_weights'])} kept edges; scores {ref['scores']}")


if __name__ == "__main__":
    main()
