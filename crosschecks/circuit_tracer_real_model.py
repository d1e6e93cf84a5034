"""clt_hub vs circuit-tracer 0.5.0 (nnsight backend) on real models: Gemma-3-270M and SmolLM2-135M-Instruct.

Runs in circuit-tracer's venv (`python3 -m nox -s peer`, transformers 4.57). Both tools trace the same
converted model folder (clt_hub.load_model by name, converted by this venv's transformers into
$CLT_HUB_CACHE), the same per-layer transcoder set and the same token ids, with the same
max_feature_nodes, batch size and logit targets. The transcoder set is random but realistic in shape:
4096 features per layer, thresholds set so about 20 features fire per layer and token (like a trained
transcoder's L0), decoder norms scaled so the reconstruction is as large as the real MLP output. clt_hub
writes it once in circuit-tracer's `transcoder_set` layout (`save_pretrained(layout="circuit-tracer")`) and
both tools read those files. Hooks: features read the MLP input (`mlp.hook_in`: Gemma-3's
pre_feedforward_layernorm output, Llama's post_attention_layernorm output) and write `hook_mlp_out`
(Gemma-3: after post_feedforward_layernorm; Llama: the MLP output), which both tools map to the same modules.

Each tool runs in its own fresh process (the script re-invokes itself with --child) so peak memory is its own.
Nodes are aligned by (layer, position, feature) for features, (layer, position) for errors, position for
tokens and token id for logits; only edges between nodes present in both graphs are compared. circuit-tracer
zeroes the error vectors at position 0 (docs/benchmarks.md), so those columns are reported apart and the
scores are compared with them zeroed on clt_hub's side too. Under a node budget the two selections must be equal,
or differ only through circuit-tracer's token scale on Gemma (see `selection_explained`, checked on its own rows).

    python crosschecks/circuit_tracer_real_model.py [--models gemma-3-270m smollm2-135m-instruct] [--nodes 64 all] [--smoke]

`--smoke`: the same on a tiny random model of each family (Gemma-3; Llama for SmolLM2) with a word tokenizer,
built in a temporary folder, and 32 features per layer: a check in seconds that the code path runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Dallas is a city in the state of"
MODELS = ("gemma-3-270m", "smollm2-135m-instruct")
FAMILY = {"gemma-3-270m": "gemma3", "smollm2-135m-instruct": "llama"}  # for --smoke's tiny models
IN_HOOK, OUT_HOOK = "mlp.hook_in", "hook_mlp_out"
BATCH = 64


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


# The prompt's ids under each model's own tokenizer (transformers 5.x reads these GGUF tokenizers correctly),
# with circuit-tracer's convention: a special token first (SmolLM2 adds none; circuit-tracer prepends its
# bos_token <|im_start|>). Both tools get these very ids.
REFERENCE_IDS = {
    "gemma-3-270m": [2, 120384, 563, 496, 3207, 528, 506, 1883, 529],
    "smollm2-135m-instruct": [1, 52, 22741, 314, 253, 2240, 281, 260, 1215, 282],
}


def prompt_ids(name: str, tokenizer) -> list[int]:
    """The reference ids, after saying whether this venv's tokenizer agrees: transformers 4.57 converts
    Gemma-3's GGUF tokenizer as a Unigram model without merges, which splits 'Dallas' into 'Da' 'll' 'as'.
    A model without reference ids (--smoke's tiny ones) gets its tokenizer's."""
    ids = tokenizer(PROMPT)["input_ids"]
    if ids[0] not in tokenizer.all_special_ids:
        ids = [tokenizer.bos_token_id, *ids]
    if name not in REFERENCE_IDS:
        return ids
    if ids != REFERENCE_IDS[name]:
        print(f"NOTE: this venv's {name} tokenizer ({type(tokenizer).__name__}) gives {len(ids)} tokens "
              f"{tokenizer.convert_ids_to_tokens(ids)}; the model's own tokenizer gives {len(REFERENCE_IDS[name])} "
              f"{tokenizer.convert_ids_to_tokens(REFERENCE_IDS[name])}: using those ids")
    return REFERENCE_IDS[name]


def embed_scale(folder: str) -> float:
    """Gemma multiplies token embeddings by sqrt(d_model) (clt_hub's adapter knows which families do)."""
    import transformers as T

    from clt_hub.models.adapters import adapter_for

    config = T.AutoConfig.from_pretrained(folder)
    return float(config.hidden_size) ** 0.5 if adapter_for(config).embed_scale_sqrt_d else 1.0


def make_transcoder(name: str, folder: Path, features: int, l0: float, seed: int) -> dict:
    """A random per-layer transcoder set for model `name`, realistic in width and density, written in
    circuit-tracer's transcoder_set layout."""
    from clt_hub import Transcoder, TranscoderConfig
    from clt_hub.models.hooks import mlp_io
    from clt_hub.models.known import KNOWN
    from clt_hub.models.loading import load_model

    model, tok = load_model(name)
    ids = torch.tensor(prompt_ids(name, tok))
    cfg = TranscoderConfig(n_layers=model.config.num_hidden_layers, d_model=model.config.hidden_size,
                           d_sae=features, kind="plt", feature_input_hook=IN_HOOK, feature_output_hook=OUT_HOOK,
                           model_name=KNOWN[name].hub_id if name in KNOWN else name)
    tc = Transcoder.from_config(cfg)
    tc.reset_parameters(generator=torch.Generator().manual_seed(seed))
    x, y = mlp_io(model, ids[None], IN_HOOK, OUT_HOOK)  # [1, T, L, d]
    with torch.no_grad():
        for l in range(cfg.n_layers):
            # threshold at the quantile where ~l0 features per token fire (BOS excluded: both tools zero it)
            pre = tc.pre_activations(x[0, 1:, l], l)
            tc.threshold[l].fill_(float(pre.flatten().kthvalue(int(pre.numel() * (1 - l0 / features))).values))
            # decoder norms: the reconstruction as large as the true MLP output, as a trained transcoder's is
            recon = tc.activate(pre, l) @ tc.W_dec[l][:, 0, :]
            tc.W_dec[l].mul_(y[0, 1:, l].norm(dim=-1).mean() / recon.norm(dim=-1).mean().clamp(min=1e-12))
    tc.save_pretrained(folder, layout="circuit-tracer")
    return {"ids": ids.tolist(), "tokens": tok.convert_ids_to_tokens(ids.tolist()), "n_layers": cfg.n_layers,
            "d_model": cfg.d_model, "embed_scale": embed_scale(model.name_or_path)}


def _measure(fn):
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    base = _status("VmRSS")
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, {"wall_s": wall, "cpu_s": cpu, "peak_extra_mb": _status("VmHWM") - base, "peak_rss_mb": _status("VmHWM"),
                 "rss_before_mb": base, "load": load}


def child_clt(name: str, folder: Path, ids: list[int], nodes: int | None, out: Path) -> dict:
    from _graphs import bos_errors_zeroed

    from clt_hub import Transcoder
    from clt_hub.attribution.attribute import attribute
    from clt_hub.attribution.pruning import scores
    from clt_hub.models.loading import load_model

    model, _ = load_model(name)
    tc = Transcoder.from_pretrained(folder)
    g, m = _measure(lambda: attribute(model, tc, torch.tensor(ids), batch_size=BATCH, max_feature_nodes=nodes))
    native = scores(g)
    convention = scores(bos_errors_zeroed(g))
    torch.save({"adjacency": g.adjacency, "features": g.features, "logit_tokens": g.logit_tokens,
                "n_layers": g.n_layers, "n_pos": g.n_pos}, out)
    return {**m, **g.meta["timings"], "n_features": g.n_features,
            "replacement": convention.replacement, "completeness": convention.completeness,
            "replacement_native": native.replacement, "completeness_native": native.completeness}


def child_ct(name: str, folder: Path, ids: list[int], nodes: int | None, out: Path) -> dict:
    import yaml
    from circuit_tracer import ReplacementModel
    from circuit_tracer import attribute as ct_attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.utils.hf_utils import load_transcoders

    from clt_hub.models.known import resolve_model

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    # offline: list the local layer files (its Hub loader would otherwise download config.yaml first)
    cfg["transcoders"] = [str(folder / f"layer_{l}.safetensors") for l in range(len(list(folder.glob("layer_*"))))]
    transcoders = load_transcoders(cfg, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                                   lazy_decoder=False)
    model = ReplacementModel.from_pretrained_and_transcoders(resolve_model(name), transcoders, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=torch.float32)
    g, m = _measure(lambda: ct_attribute(torch.tensor(ids), model, batch_size=BATCH, max_feature_nodes=nodes))
    replacement, completeness = compute_graph_scores(g)
    # its token edges use the unscaled embedding row (see compare); scores again with them scaled as the model does
    fixed = copy.copy(g)
    fixed.adjacency_matrix = g.adjacency_matrix.clone()
    tokens = slice(len(g.selected_features) + model.cfg.n_layers * len(ids), -len(g.logit_token_ids))
    fixed.adjacency_matrix[:, tokens] *= embed_scale(resolve_model(name))
    replacement_fixed, completeness_fixed = compute_graph_scores(fixed)
    torch.save({"adjacency": g.adjacency_matrix, "features": g.active_features[g.selected_features],
                "logit_tokens": torch.as_tensor(g.logit_token_ids), "n_layers": model.cfg.n_layers,
                "n_pos": len(g.input_tokens), "logit_probabilities": g.logit_probabilities.float()}, out)
    return {**m, "active_features": len(g.active_features), "n_features": len(g.selected_features),
            "replacement_as_is": float(replacement), "completeness_as_is": float(completeness),
            "replacement": float(replacement_fixed), "completeness": float(completeness_fixed)}


def _keys(g: dict) -> list[tuple]:
    """Node identities in a graph's order: features, errors (layer-major), tokens, logits."""
    L, T = g["n_layers"], g["n_pos"]
    return ([("f", *f) for f in g["features"].tolist()] + [("e", l, p) for l in range(L) for p in range(T)]
            + [("t", p) for p in range(T)] + [("l", t) for t in g["logit_tokens"].tolist()])


def compare(ours: dict, theirs: dict, token_scale: float) -> dict:
    """Max |edge difference| over the nodes both graphs have, by kind of source node. circuit-tracer's nnsight
    backend multiplies the gradient at the embedding output by the unscaled embedding row, so on Gemma (which
    scales embeddings by sqrt(d_model)) its token edges are sqrt(d_model) too small; they are compared after
    scaling them by `token_scale`, and as they are (`token_as_is`)."""
    ko, kt = _keys(ours), _keys(theirs)
    index_t = {k: i for i, k in enumerate(kt)}
    common = [k for k in ko if k in index_t]
    io = torch.tensor([i for i, k in enumerate(ko) if k in index_t])
    it = torch.tensor([index_t[k] for k in common])
    a_o = ours["adjacency"][io][:, io].double()
    a_t = theirs["adjacency"][it][:, it].double()
    kind = [k[0] for k in common]
    token = torch.tensor([c == "t" for c in kind])
    token_as_is = (a_o[:, token] - a_t[:, token]).abs().max().item()
    a_t[:, token] *= token_scale
    diff = (a_o - a_t).abs()
    bos_error = torch.tensor([k[0] == "e" and k[2] == 0 for k in common])
    scale = a_t[:, ~bos_error].abs().max().item()
    by_kind = {"token_as_is": token_as_is}
    for name, sel in (("feature", "f"), ("error", "e"), ("token", "t")):
        cols = torch.tensor([c == sel for c in kind]) & ~bos_error
        by_kind[name] = diff[:, cols].max().item() if cols.any() else 0.0
    return {"common_features": sum(c == "f" for c in kind), "our_features": sum(k[0] == "f" for k in ko),
            "their_features": sum(k[0] == "f" for k in kt), "same_logits": ours["logit_tokens"].tolist()
            == theirs["logit_tokens"].tolist(), "n_logits": len(ours["logit_tokens"]),
            "max_diff": diff[:, ~bos_error].max().item(), "largest_edge": scale, "by_kind": by_kind,
            "bos_error_max_ours": a_o[:, bos_error].abs().max().item(),
            "bos_error_max_theirs": a_t[:, bos_error].abs().max().item()}


def first_selection(full: dict, k: int, token_scale: float) -> set[tuple]:
    """The k features that circuit-tracer's first selection step takes from a graph over every feature (`full`,
    its own): influence on the logits through the logit rows alone, each row normalised by its |edges| sum and
    weighted by its logit's probability. With k <= BATCH that step is the whole selection. `token_scale` scales
    its token columns first (see `compare`): they enter each row's normalising sum, so on Gemma its
    sqrt(d_model)-too-small token edges change which features rank first."""
    n_f = len(full["features"])
    rows = full["adjacency"][-len(full["logit_tokens"]):].double().abs()
    tokens = slice(n_f + full["n_layers"] * full["n_pos"], n_f + (full["n_layers"] + 1) * full["n_pos"])
    rows[:, tokens] *= token_scale
    influence = (full["logit_probabilities"].double()[:, None] * rows / rows.sum(1, keepdim=True).clamp(min=1e-8)).sum(0)
    top = influence[:n_f].argsort(descending=True)[:k]
    return {tuple(f) for f in full["features"][top].tolist()}


def selection_explained(ours: dict, theirs: dict, full_theirs: dict, k: int, token_scale: float) -> bool:
    """Whether different feature selections under a node budget are circuit-tracer's token scale and nothing else:
    its own rows give its selection as they are, and exactly clt_hub's with the token edges scaled."""
    return (k <= BATCH and first_selection(full_theirs, k, 1.0) == {tuple(f) for f in theirs["features"].tolist()}
            and first_selection(full_theirs, k, token_scale) == {tuple(f) for f in ours["features"].tolist()})


def run_child(tool: str, name: str, folder: Path, ids: list[int], nodes: int | None, out: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", tool, name, str(folder), json.dumps(ids),
                           str(nodes or 0), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{tool} on {name} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--nodes", nargs="+", default=["64", "all"], help="max_feature_nodes values; 'all' = every feature")
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=20.0, help="active features per layer and token")
    ap.add_argument("--smoke", action="store_true", help="tiny random models of the same families, in seconds")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        tool, name, folder, ids, nodes, out = args.child
        fn = child_clt if tool == "clt_hub" else child_ct
        print(json.dumps(fn(name, Path(folder), json.loads(ids), int(nodes) or None, Path(out))))
        return 0

    import transformers

    start = time.perf_counter()
    rows: list[tuple] = []
    ok = True
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
        from _tiny import save_tiny_model

        args.features, args.l0, args.nodes = 32, 4.0, ["8", "all"]
    # every budget is checked against circuit-tracer's graph over all features, so that one runs first
    args.nodes = sorted(set(args.nodes) | {"all"}, key=lambda n: n != "all")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            folder = work / f"plt-{name}"
            model = name  # what both tools load: the known model, or with --smoke a tiny one of its family
            if args.smoke:
                model = save_tiny_model(work / name, FAMILY[name], [PROMPT])
                name = f"{name} (tiny random)"
            t0 = time.perf_counter()
            info = make_transcoder(model, folder, args.features, args.l0, seed=0)
            print(f"\n{name}: {info['n_layers']} layers, d_model {info['d_model']}; PLT {args.features} features/layer "
                  f"(~{args.l0:g} active per layer and token), written in {time.perf_counter() - t0:.1f} s; prompt "
                  f"{len(info['ids'])} tokens {info['tokens']}", flush=True)
            full_theirs: dict = {}
            for nodes_arg in args.nodes:
                nodes = None if nodes_arg == "all" else int(nodes_arg)
                out = {tool: work / f"{tool}-{len(rows)}.pt" for tool in ("circuit-tracer", "clt_hub")}
                theirs = run_child("circuit-tracer", model, folder, info["ids"], nodes, out["circuit-tracer"])
                ours = run_child("clt_hub", model, folder, info["ids"], nodes, out["clt_hub"])
                g_ours, g_theirs = torch.load(out["clt_hub"]), torch.load(out["circuit-tracer"])
                full_theirs = full_theirs or g_theirs
                c = compare(g_ours, g_theirs, info["embed_scale"])
                rel = c["max_diff"] / max(c["largest_edge"], 1e-30)
                score_diff = max(abs(ours["replacement"] - theirs["replacement"]),
                                 abs(ours["completeness"] - theirs["completeness"]))
                same_nodes = c["common_features"] == c["our_features"] == c["their_features"]
                explained = not same_nodes and nodes is not None and selection_explained(
                    g_ours, g_theirs, full_theirs, nodes, info["embed_scale"])
                print(f"  max_feature_nodes {nodes_arg}: {ours['active_features']} active features (circuit-tracer "
                      f"{theirs['active_features']}); nodes {c['our_features']} / {c['their_features']}, "
                      f"{c['common_features']} in both; {c['n_logits']} logit(s), same: {c['same_logits']}")
                print(f"    max |edge diff| {c['max_diff']:.2e} (largest edge {c['largest_edge']:.2e}, relative "
                      f"{rel:.1e}); by source: features {c['by_kind']['feature']:.1e}, errors "
                      f"{c['by_kind']['error']:.1e}, tokens {c['by_kind']['token']:.1e} (circuit-tracer's token "
                      f"edges x {info['embed_scale']:.4g}; as they are: {c['by_kind']['token_as_is']:.1e})")
                print(f"    BOS error columns: largest clt_hub edge {c['bos_error_max_ours']:.2e}, circuit-tracer "
                      f"{c['bos_error_max_theirs']:.2e} (zeroed)")
                print(f"    scores (BOS errors zeroed on both sides, token edges scaled): replacement "
                      f"{ours['replacement']:.4f} vs {theirs['replacement']:.4f}, completeness {ours['completeness']:.4f} "
                      f"vs {theirs['completeness']:.4f}; circuit-tracer's as they are: {theirs['replacement_as_is']:.4f}"
                      f" / {theirs['completeness_as_is']:.4f}; clt_hub's own (BOS errors counted): "
                      f"{ours['replacement_native']:.4f} / {ours['completeness_native']:.4f}")
                for tool, r in (("circuit-tracer", theirs), ("clt_hub", ours)):
                    print(f"    {tool:15} attribute {r['wall_s']:7.2f} s (CPU {r['cpu_s']:6.1f} s), peak RSS {r['peak_rss_mb']:6.0f} MiB "
                          f"(+{r['peak_extra_mb']:5.0f} during attribution), load avg {r['load']:.1f}", flush=True)
                if explained:
                    print(f"    the selections differ by circuit-tracer's token scale alone: its own logit rows select "
                          f"its {nodes} features as they are and exactly clt_hub's with its token edges x "
                          f"{info['embed_scale']:.4g}; scores of different node sets are not compared")
                rows.append((name, nodes_arg, ours, theirs, c, rel, score_diff))
                ok = (ok and c["same_logits"] and rel < 1e-4
                      and (score_diff < 1e-4 if same_nodes else explained))
    print(f"\ncircuit-tracer 0.5.0 (nnsight backend) vs clt_hub; transformers {transformers.__version__}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; prompt {PROMPT!r}; batch {BATCH}")
    print("| model | max_feature_nodes | active features | feature nodes (in both) | max abs edge diff (relative) | "
          "replacement clt_hub / c-t | completeness clt_hub / c-t | attribute wall clt_hub / c-t | CPU clt_hub / c-t | "
          "peak RSS clt_hub / c-t | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, nodes_arg, o, t, c, rel, _ in rows:
        print(f"| {name} | {nodes_arg} | {o['active_features']} | {c['our_features']} ({c['common_features']}) | "
              f"{c['max_diff']:.1e} ({rel:.1e}) | {o['replacement']:.4f} / {t['replacement']:.4f} | "
              f"{o['completeness']:.4f} / {t['completeness']:.4f} | {o['wall_s']:.1f} s / {t['wall_s']:.1f} s = "
              f"{o['wall_s'] / t['wall_s']:.2f}x | {o['cpu_s']:.1f} s / {t['cpu_s']:.1f} s = {o['cpu_s'] / t['cpu_s']:.2f}x | "
              f"{o['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} MiB | {o['load']:.1f} / {t['load']:.1f} |")
    print(f"total {time.perf_counter() - start:.0f} s")
    print("OK: same graphs within 1e-4 (relative)" if ok else "FAILED: graphs differ (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
