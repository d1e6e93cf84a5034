"""Issue 39, item 6: a weights-based worked example on the organism (as Dunefsky et al. 2024 did for
greater-than). Trace the two-hop prompt for Dallas exactly as the two-hop check does (and the first
prompt of the addition check), find the check's group, and for each of its features compare what the
weights alone say with the prompt's edges into it:

- its de-embedding (top tokens), and where it has upstream features (layer > 0) its virtual weights and
  its global weights (TWERA) over the first N_TOKENS tokens of the organism's training corpus, against
  the prompt's incoming feature edges: top-k overlap and Spearman rank correlation;
- `factorise`: the share of its incoming feature-edge mass that same-position residual terms
  (activation x virtual weight x norm factor; the norm factor is 1 here, the CLT reads hook_resid_mid)
  explain, the rest being attention paths;
- for its layer-0 features (no upstream features at all): the incoming token edges split into the
  direct embedding path and each layer-0 head's OV path (attention weight x frozen ln_1 scale x the
  head's input-invariant OV de-embedding of the token), and, for the head that carries most of the
  source token's edge, where the source token ranks in it: over the vocabulary and among its peers (the
  40 cities; the 10 digits).

Prints the time `global_weights` takes per feature over N_TOKENS tokens, and writes the figure and the
numbers (docs/research/weights_circuits.md is the write-up):

    PYTHONPATH=. python docs/experiments/weights_two_hop.py

Writes docs/research/figures/weights_two_hop.png and docs/research/weights_two_hop.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clt_hub.attribution import weights as W
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.frozen import FrozenForward
from paper_cases import addition, common, two_hop
from paper_cases.corpus import STATES, build

N_TOKENS = 20_000   # corpus tokens for global weights (BOS left out): the first training texts of build(0)
K = 10              # top-k for overlaps
SHOWN = 5           # rows shown per feature in the printed tables
ROOT = Path(__file__).resolve().parents[2]
FIGURE = ROOT / "docs/research/figures/weights_two_hop.png"
NUMBERS = ROOT / "docs/research/weights_two_hop.json"
Feature = tuple[int, int, int]


@dataclass
class Case:
    name: str
    traced: common.Traced
    group: list[Feature]
    source_pos: int  # the token the check's group is driven from (the city, the operand's ones digit)
    peers: list[str]  # tokens of the source's kind (every city; the ten digits)
    kin: list[str]    # the peers that should read alike (the source state's cities; the digit itself)


def two_hop_case(subject: common.Subject) -> Case:
    """The Dallas prompt, traced and grouped exactly as two_hop.check does."""
    prompt, answer, city, _, _ = next(p for p in two_hop.organism_prompts() if p[2] == "Dallas")
    t = common.trace(subject, prompt, target=subject.first_token(answer))
    pos = two_hop._position(subject, t.ids, city)
    group = common.find_group(t, sources=[t.graph.token_index(pos)], positions=set(range(pos, len(t.ids))))
    state = next(s for s, cities in STATES.items() if city in cities)
    return Case(f"two-hop: {prompt!r} -> {answer!r}", t, group, pos,
                [c for cities in STATES.values() for c in cities], STATES[state])


def addition_case(subject: common.Subject) -> Case:
    """The addition check's first pair at its default 8 variants (`python -m paper_cases`), as it traces it."""
    a, b = addition.organism_pairs(8)[0]
    prompt, answer = addition.organism_prompt(a, b)
    t = common.trace(subject, prompt, target=subject.first_token(answer))
    pos_a, _ = addition._digit_positions(subject, t.ids)
    group = common.find_group(t, sources=[t.graph.token_index(pos_a)])
    return Case(f"addition: {prompt!r} -> {answer!r}", t, group, pos_a, [str(d) for d in range(10)],
                [str(a % 10)])


def name(f: Feature | tuple[int, int]) -> str:
    return f"L{f[0]}/{f[-1]}" + (f"@{f[1]}" if len(f) == 3 else "")


def ranks_by_abs(values: torch.Tensor) -> torch.Tensor:
    """1 for the largest |value|, over the flattened tensor."""
    order = values.flatten().abs().argsort(descending=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(1, len(order) + 1)
    return out.reshape(values.shape)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho of two float vectors (no ties among real-valued edges and weights)."""
    if len(x) < 3:
        return float("nan")

    def r(v: torch.Tensor) -> torch.Tensor:
        return v.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([r(x), r(y)]))[0, 1])


def incoming_split(g: Any, node: int) -> dict[str, float]:
    """The feature's incoming |edge| mass from feature, error and token nodes."""
    row, nf, ne = g.incoming(node).float(), g.n_features, g.n_errors
    return {"features": float(row[:nf].abs().sum()), "errors": float(row[nf:nf + ne].abs().sum()),
            "tokens": float(row[nf + ne:nf + ne + g.n_pos].abs().sum())}


def upstream_comparison(subject: common.Subject, g: Any, node: int, f: Feature, texts: list[str],
                        fz: W.Factorisation) -> dict[str, Any]:
    """A feature with upstream features: the prompt's incoming feature edges against V and TWERA."""
    model, tok, tc = subject.model, subject.tokenizer, subject.transcoder
    layer, _, fid = f
    gw = W.global_weights(model, tok, tc, texts, layer, fid, N_TOKENS, k=K)
    v, tw = gw.virtual, gw.twera
    v_rank, tw_rank = ranks_by_abs(v), ranks_by_abs(tw)
    row = g.incoming(node)[: g.n_features].float()
    src = row.nonzero().flatten()
    feats = g.features[src]
    # the prompt's upstream features: edges summed over positions per (layer, id)
    summed: dict[tuple[int, int], float] = {}
    for (s, _, i), e in zip(feats.tolist(), row[src].tolist(), strict=True):
        summed[(s, i)] = summed.get((s, i), 0.0) + e
    keys = sorted(summed, key=lambda k: -abs(summed[k]))
    edge = torch.tensor([summed[k] for k in keys])
    vv = torch.tensor([float(v[k]) for k in keys])
    tt = torch.tensor([float(tw[k]) for k in keys])
    top_prompt = set(keys[:K])

    def top_k(w: torch.Tensor) -> list[tuple[int, int]]:
        idx = w.flatten().abs().topk(K).indices.tolist()
        return [(i // tc.d_sae, i % tc.d_sae) for i in idx]
    top_v, top_tw = top_k(v), top_k(tw)
    active = {(s, i) for s, _, i in g.features.tolist() if s < layer}
    where = (fz.targets == node).nonzero().flatten()
    explained = float(fz.explained[where[0]]) if len(where) else float("nan")
    same = fz.target == node
    rows = []
    for (s, i), e in zip(keys[:20], edge[:20].tolist(), strict=True):  # the 20 strongest are kept
        nodes = [n for n, (ls, _, li) in zip(src.tolist(), feats.tolist(), strict=True) if (ls, li) == (s, i)]
        positions = sorted(int(g.features[n, 1]) for n in nodes)
        rows.append({"upstream": name((s, i)), "positions": positions, "edge": e, "virtual": float(v[s, i]),
                     "virtual_rank": int(v_rank[s, i]), "twera": float(tw[s, i]), "twera_rank": int(tw_rank[s, i]),
                     "coactivation": float(gw.coactivation[s, i])})
    return {
        "explained_by_residual": explained,
        "same_position_edges": int(same.sum()), "upstream_nodes": len(src), "upstream_features": len(keys),
        "candidates": layer * tc.d_sae,
        "top_prompt_in_top_virtual": len(top_prompt & set(top_v)),
        "top_prompt_in_top_twera": len(top_prompt & set(top_tw)),
        "top_virtual_active_in_prompt": sum(k in active for k in top_v),
        "top_twera_active_in_prompt": sum(k in active for k in top_tw),
        # interference: top virtual-weight neighbours that never fire on a token where this feature fires
        "top_virtual_never_coactive": sum(float(gw.coactivation[k]) == 0 for k in top_v),
        "mass": {"total": float(g.incoming(node)[: g.n_features].abs().sum()),
                 "same_position": float(fz.edge[same].abs().sum()),
                 "same_position_minus_residual": float((fz.edge[same] - fz.residual[same]).abs().sum())},
        "spearman_edge_virtual": spearman(edge, vv), "spearman_edge_twera": spearman(edge, tt),
        # the same-position edges alone, against their residual terms (activation x V) and against V
        "spearman_same_position_edge_residual": spearman(fz.edge[same], fz.residual[same]),
        "spearman_same_position_edge_virtual": spearman(fz.edge[same], fz.virtual_weight[same]),
        "top_virtual": [{"upstream": name(k), "virtual": float(v[k]), "active_in_prompt": k in active}
                        for k in top_v],
        "top_twera": [{"upstream": name(k), "twera": float(tw[k]), "active_in_prompt": k in active}
                      for k in top_tw],
        "prompt_upstream": rows,
        "global_weights": {"texts": gw.texts, "tokens": gw.tokens, "active_tokens": gw.active_tokens,
                           "seconds": gw.seconds},
    }


class TokenPaths:
    """Token edges into layer-0 features, split exactly: the direct path (embedding . read direction, same
    position only) plus, per layer-0 head h, A_h[q, p] x s_p x (embedding of token p . OV pullback of the read
    direction), s_p the frozen ln_1 scale at p. All but A_h and s_p is input-invariant."""

    def __init__(self, subject: common.Subject, ids: torch.Tensor):
        self.model, self.tc = subject.model, subject.transcoder
        self.adapter = adapter_for(self.model)
        ff = FrozenForward(self.model, self.adapter)
        with torch.no_grad(), ff.recording():
            self.model(ids[None])
        T = len(ids)
        attn0 = get_module(self.model, f"{self.adapter.layers}.0.{self.adapter.attn}")
        self.pattern = ff.patterns[id(attn0)].pattern(0, T, T)[0].float()           # [heads, T, T]
        self.scale = ff.scales[f"{self.adapter.layers}.0.{self.adapter.attn_norms[0]}"][0, :, 0].float()  # [T]
        table: torch.Tensor = get_module(self.model, self.adapter.embed).weight  # type: ignore[assignment]
        self.emb = table.detach().float()                                            # [vocab, d]
        self.ids = ids
        self.heads = self.pattern.shape[0]

    @torch.no_grad()
    def ov_de_embedding(self, fid: int) -> torch.Tensor:
        """[heads, vocab]: each token's embedding . head h's OV pullback of the feature's read direction."""
        r = W.read_directions(self.tc, 0, torch.tensor([fid]), self.model)[0].float()
        pulled = torch.stack([W._ov_pullback(self.model, self.adapter, 0, h, r) for h in range(self.heads)])
        return pulled.float() @ self.emb.T

    @torch.no_grad()
    def split(self, fid: int, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(direct [T], per-head [heads, T], their sum [T]) for the token edges into feature fid at position q."""
        r = W.read_directions(self.tc, 0, torch.tensor([fid]), self.model)[0].float()
        emb = self.emb[self.ids]                                                      # [T, d]
        direct = torch.zeros(len(self.ids))
        direct[q] = emb[q] @ r
        ov = self.ov_de_embedding(fid)[:, self.ids]                                   # [heads, T]
        heads = self.pattern[:, q, :] * self.scale[None, :] * ov
        return direct, heads, direct + heads.sum(0)


def layer0_token_paths(subject: common.Subject, case: Case, paths: TokenPaths, node: int, f: Feature
                       ) -> dict[str, Any]:
    g, tok = case.traced.graph, subject.tokenizer
    _, q, fid = f
    direct, heads, total = paths.split(fid, q)
    edges = g.incoming(node)[g.token_index(0):g.token_index(0) + g.n_pos].float()
    p = case.source_pos
    best = int(heads[:, p].abs().argmax())
    table = paths.ov_de_embedding(fid)[best]
    source_token = int(case.traced.ids[p])
    top = table.topk(SHOWN)
    peers = torch.tensor([subject.token(w) for w in case.peers])
    by_peer = [case.peers[i] for i in table[peers].argsort(descending=True).tolist()]
    return {
        "token_edges_max_abs_error": float((edges - total).abs().max()),
        "token_edge_mass": float(edges.abs().sum()),
        "source_token": tok.decode([source_token]), "source_edge": float(edges[p]),
        "source_edge_direct": float(direct[p]), "source_edge_heads": heads[:, p].tolist(),
        "source_head": best, "source_head_attention": float(paths.pattern[best, q, p]),
        "source_head_top_tokens": [[tok.decode([i]), float(w)] for w, i in zip(top.values.tolist(),
                                                                               top.indices.tolist(), strict=True)],
        "source_token_rank_in_head": int((table > table[source_token]).sum()) + 1, "vocab": len(table),
        "source_rank_among_peers": by_peer.index(tok.decode([source_token])) + 1, "peers": len(case.peers),
        "kin_in_top_peers": len(set(by_peer[:len(case.kin)]) & set(case.kin)), "kin": case.kin,
        "top_peers": by_peer[:len(case.kin) + 2],
        "same_position_token": tok.decode([int(case.traced.ids[q])]), "same_position_edge": float(edges[q]),
        "same_position_direct": float(direct[q]),
    }


def study(subject: common.Subject, case: Case, texts: list[str]) -> dict[str, Any]:
    g = case.traced.graph
    index = {tuple(x): i for i, x in enumerate(g.features.tolist())}
    fz = W.factorise(g, subject.model, subject.transcoder)
    paths = TokenPaths(subject, case.traced.ids)
    out: list[dict[str, Any]] = []
    for f in case.group:
        node = index[f]
        de = W.de_embedding(subject.model, subject.transcoder, f[0], f[2], k=SHOWN, tokenizer=subject.tokenizer)
        entry: dict[str, Any] = {"feature": name(f), "layer": f[0], "position": f[1], "id": f[2],
                                 "activation": float(g.activations[node]), "incoming": incoming_split(g, node),
                                 "de_embedding_top": [[t.text, t.weight] for t in de.top]}
        if f[0] > 0:
            entry["upstream"] = upstream_comparison(subject, g, node, f, texts, fz)
        else:
            entry["token_paths"] = layer0_token_paths(subject, case, paths, node, f)
        out.append(entry)
    l0 = [e["token_paths"] for e in out if "token_paths" in e]
    summary = {"features": len(l0), "peers": len(case.peers), "kin": len(case.kin),
               "source_first": sum(p["source_rank_among_peers"] == 1 for p in l0),
               "median_source_rank": sorted(p["source_rank_among_peers"] for p in l0)[(len(l0) - 1) // 2] if l0 else None,
               "kin_in_top": sum(p["kin_in_top_peers"] for p in l0),
               # expected kin among the top len(kin) peers if the head ranked the peers at random
               "chance": len(l0) * len(case.kin) ** 2 / len(case.peers)}
    # every same-position feature -> feature edge into the group, for the figure
    group_nodes = torch.tensor([index[f] for f in case.group])
    into = torch.isin(fz.target, group_nodes)
    return {"case": case.name, "tokens": subject.tokens(case.traced.ids), "source_position": case.source_pos,
            "replacement": case.traced.replacement, "completeness": case.traced.completeness,
            "group": out, "layer0_summary": summary, "pairs": {"edge": fz.edge[into].tolist(), "residual": fz.residual[into].tolist(),
                                    "target": [name(tuple(g.features[int(n)].tolist())) for n in fz.target[into]]}}


def print_case(r: dict[str, Any]) -> None:
    print(f"\n## {r['case']}  (group of {len(r['group'])}; replacement {r['replacement']:.3f}, completeness "
          f"{r['completeness']:.3f})")
    print("| feature | act | incoming mass: features / errors / tokens | residual share of feature-edge mass | "
          "de-embedding top tokens |")
    print("|---|---|---|---|---|")
    for e in r["group"]:
        m, up = e["incoming"], e.get("upstream")
        share = "-" if up is None else f"{up['explained_by_residual']:.3f}"
        print(f"| {e['feature']} | {e['activation']:.2f} | {m['features']:.2f} / {m['errors']:.2f} / "
              f"{m['tokens']:.2f} | {share} | {', '.join(repr(t) for t, _ in e['de_embedding_top'])} |")
    ups = [e for e in r["group"] if "upstream" in e]
    if ups:
        print("\n| feature | upstream features in prompt (nodes) | prompt top-10 in top-10 abs V | in top-10 abs TWERA | "
              "top-10 abs V active in prompt | never co-active on corpus | top-10 abs TWERA active | "
              "Spearman(edge, V) | Spearman(edge, TWERA) | same-position edges: Spearman(edge, V) | "
              "Spearman(edge, a V) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for e in ups:
            u = e["upstream"]
            print(f"| {e['feature']} | {u['upstream_features']} ({u['upstream_nodes']}) | "
                  f"{u['top_prompt_in_top_virtual']} | {u['top_prompt_in_top_twera']} | "
                  f"{u['top_virtual_active_in_prompt']} | {u['top_virtual_never_coactive']} | "
                  f"{u['top_twera_active_in_prompt']} | "
                  f"{u['spearman_edge_virtual']:.2f} | {u['spearman_edge_twera']:.2f} | "
                  f"{u['spearman_same_position_edge_virtual']:.2f} ({u['same_position_edges']}) | "
                  f"{u['spearman_same_position_edge_residual']:.2f} |")
        for e in ups:
            u = e["upstream"]
            print(f"\n{e['feature']}: the prompt's strongest upstream features (of {u['candidates']} candidates)")
            print("| upstream | positions | edge | V | rank by abs V | TWERA | rank by abs TWERA |")
            print("|---|---|---|---|---|---|---|")
            for x in u["prompt_upstream"][:SHOWN]:
                print(f"| {x['upstream']} | {x['positions']} | {x['edge']:+.3f} | {x['virtual']:+.3f} | "
                      f"{x['virtual_rank']} | {x['twera']:+.4f} | {x['twera_rank']} |")
    l0 = [e for e in r["group"] if "token_paths" in e]
    if l0:
        src = l0[0]["token_paths"]["source_token"]
        print(f"\nlayer-0 features: token edges = direct + per-head OV (max |graph - split| over all of them: "
              f"{max(e['token_paths']['token_edges_max_abs_error'] for e in l0):.1e})")
        print(f"| feature | edge from {src!r} | of it: direct | its head (attention) | rank of {src!r} in that "
              f"head's OV de-embedding: vocabulary, peers | kin in top peers | head's top tokens | "
              "edge from the same-position token (of it: direct) |")
        print("|---|---|---|---|---|---|---|---|")
        for e in l0:
            p = e["token_paths"]
            print(f"| {e['feature']} | {p['source_edge']:+.3f} | {p['source_edge_direct']:+.3f} | "
                  f"{p['source_head']} ({p['source_head_attention']:.2f}) | {p['source_token_rank_in_head']}/"
                  f"{p['vocab']}, {p['source_rank_among_peers']}/{p['peers']} | {p['kin_in_top_peers']}/"
                  f"{len(p['kin'])} | {', '.join(repr(t) for t, _ in p['source_head_top_tokens'])} | "
                  f"{p['same_position_token']!r} {p['same_position_edge']:+.3f} ({p['same_position_direct']:+.3f}) |")
        s = r["layer0_summary"]
        print(f"over the {s['features']} layer-0 features: {src!r} ranks first among the {s['peers']} peers in "
              f"{s['source_first']}, median rank {s['median_source_rank']}; kin in the top {s['kin']} peers: "
              f"{s['kin_in_top']} of {s['features'] * s['kin']} (chance {s['chance']:.2f})")


def figure(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1.0, 0.9, 1.2]})
    ax = axes[0]
    for r, marker, colour, z in zip(results[::-1], "so", ("tab:orange", "tab:blue"), (1, 2), strict=False):
        e, res = r["pairs"]["edge"], r["pairs"]["residual"]
        ax.scatter(res, e, s=12, marker=marker, color=colour, alpha=0.7, zorder=z,
                   label=f"{r['case'].split(':')[0]} ({len(e)} edges)")
    lim = max([abs(x) for r in results for x in r["pairs"]["edge"] + r["pairs"]["residual"]] + [1e-3]) * 1.05
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, zorder=0)
    ax.set_xlabel("residual term: activation x virtual weight")
    ax.set_ylabel("graph edge")
    ax.set_title("(a) same-position feature edges into the groups", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    ups = [(r["case"].split(":")[0], e) for r in results for e in r["group"] if "upstream" in e]
    names = [f"{c}\n{e['feature']}" for c, e in ups]
    masses = [e["upstream"]["mass"] for _, e in ups]
    explained = [1 - (m["total"] - m["same_position"] + m["same_position_minus_residual"]) / m["total"] for m in masses]
    rest_same = [m["same_position_minus_residual"] / m["total"] for m in masses]
    cross = [(m["total"] - m["same_position"]) / m["total"] for m in masses]
    x = list(range(len(ups)))
    ax.bar(x, explained, label="explained by residual terms (a x V)")
    ax.bar(x, rest_same, bottom=explained, label="same position, not explained (self-attention)")
    ax.bar(x, cross, bottom=[a + b for a, b in zip(explained, rest_same, strict=True)],
           label="other positions (attention)")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("share of incoming feature-edge mass (sum |edge|)")
    ax.set_title("(b) what residual terms explain (`factorise`)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center")
    ax = axes[2]
    labels, v_ranks, tw_ranks = [], [], []
    for r in results:
        for e in r["group"]:
            for u in e.get("upstream", {}).get("prompt_upstream", [])[:SHOWN]:
                labels.append(f"{e['feature']} <- {u['upstream']}")
                v_ranks.append(u["virtual_rank"])
                tw_ranks.append(u["twera_rank"])
    y = torch.arange(len(labels)).float()
    ax.barh(y - 0.2, v_ranks, height=0.4, label="rank by |virtual weight|")
    ax.barh(y + 0.2, tw_ranks, height=0.4, label=f"rank by |TWERA| ({N_TOKENS:,} tokens)")
    ax.set_yticks(y.tolist(), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(0.8, 2e4)  # room for the legend
    ax.set_xlabel("rank among all upstream features (1 = top)")
    ax.set_title(f"(c) each feature's {SHOWN} strongest upstream features on the prompt", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=100)


def rounded(x: Any) -> Any:
    """Floats to 5 significant digits, for a JSON file of readable size."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v) for v in x]
    return x


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    subject = common.load_subject()
    texts = build(0).train
    results = []
    for make in (two_hop_case, addition_case):
        case = make(subject)
        results.append(study(subject, case, texts))
        print_case(results[-1])
    timed = [(e["feature"], e["upstream"]["global_weights"]) for r in results for e in r["group"] if "upstream" in e]
    for feat, gw in timed:
        print(f"global weights {feat}: {gw['seconds']:.2f} s for {gw['tokens']} tokens ({gw['texts']} texts; "
              f"feature active on {gw['active_tokens']})")
    figure(results)
    seconds = time.perf_counter() - start
    numbers = {"n_tokens": N_TOKENS, "k": K, "seconds_total": seconds, "cases": results}
    NUMBERS.write_text(json.dumps(rounded(numbers), indent=1) + "\n")
    print(f"\nwrote {FIGURE.relative_to(ROOT)} and {NUMBERS.relative_to(ROOT)}; {seconds:.0f} s in all")


if __name__ == "__main__":
    main()
