"""clt_hub.circuits vs auto-circuit: EAP scores of every edge on the same random GPT-2-shaped model.

Runs in its own venv (`python3 -m nox -s peer_circuits`: auto-circuit 1.0.1 on TransformerLens). A random
HookedTransformer (split q/k/v inputs, per-head results) is copied into a Hugging Face GPT-2 for clt_hub, so both
tools score the very same network on the same clean/corrupted token prompts with the same metric (mean logit of
the answer - mean logit of the wrong token, at the last position). auto-circuit's mask gradient at mask 0 is its
EAP (a mask of 1 patches the edge from the corrupted run, and it minimises -metric), so its score is minus
clt_hub's; edges are matched by name (Resid Start = embed, A<l>.<h> = a<l>.h<h>, A<l>.<h>.Q = a<l>.h<h><q>,
MLP <l>, Resid End = logits). Prints the largest difference, rank agreement and wall time side by side.

    python crosschecks/auto_circuit_eap.py [--layers 2 4] [--d-model 64] [--tokens 12] [--batch 8] [--smoke]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as T
from auto_circuit.data import PromptDataLoader, PromptDataset
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
from auto_circuit.utils.graph_utils import patchable_model
from transformer_lens import HookedTransformer, HookedTransformerConfig

from clt_hub.circuits import EdgeModel, eap_scores
from clt_hub.circuits.tasks import Batch


def to_hf(tl: HookedTransformer) -> torch.nn.Module:
    """The TransformerLens GPT-2-style weights as a transformers GPT2LMHeadModel (float64)."""
    cfg = tl.cfg
    hf_cfg = T.GPT2Config(n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                          vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, activation_function="gelu_new",
                          layer_norm_epsilon=cfg.eps, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0)
    hf_cfg._attn_implementation = "eager"
    hf = T.GPT2LMHeadModel(hf_cfg).double().eval()
    sd = {k: v.double() for k, v in tl.state_dict().items()}
    d = cfg.d_model
    with torch.no_grad():
        hf.transformer.wte.weight.copy_(sd["embed.W_E"])
        hf.transformer.wpe.weight.copy_(sd["pos_embed.W_pos"])
        for l, block in enumerate(hf.transformer.h):
            p = f"blocks.{l}."
            block.ln_1.weight.copy_(sd[p + "ln1.w"])
            block.ln_1.bias.copy_(sd[p + "ln1.b"])
            block.ln_2.weight.copy_(sd[p + "ln2.w"])
            block.ln_2.bias.copy_(sd[p + "ln2.b"])
            qkv = [sd[p + f"attn.W_{x}"].permute(1, 0, 2).reshape(d, -1) for x in "QKV"]
            block.attn.c_attn.weight.copy_(torch.cat(qkv, dim=1))
            block.attn.c_attn.bias.copy_(torch.cat([sd[p + f"attn.b_{x}"].reshape(-1) for x in "QKV"]))
            block.attn.c_proj.weight.copy_(sd[p + "attn.W_O"].reshape(-1, d))
            block.attn.c_proj.bias.copy_(sd[p + "attn.b_O"])
            block.mlp.c_fc.weight.copy_(sd[p + "mlp.W_in"])
            block.mlp.c_fc.bias.copy_(sd[p + "mlp.b_in"])
            block.mlp.c_proj.weight.copy_(sd[p + "mlp.W_out"])
            block.mlp.c_proj.bias.copy_(sd[p + "mlp.b_out"])
        hf.transformer.ln_f.weight.copy_(sd["ln_final.w"])
        hf.transformer.ln_f.bias.copy_(sd["ln_final.b"])
        hf.lm_head.weight.copy_(sd["unembed.W_U"].T)
        assert sd["unembed.b_U"].abs().max() == 0
    return hf


def theirs(name: str) -> str:
    """clt_hub's edge name -> auto-circuit's."""
    def node(n: str) -> str:
        if n == "embed":
            return "Resid Start"
        if n == "logits":
            return "Resid End"
        if n.startswith("m"):
            return f"MLP {n[1:]}"
        layer, head = n[1:].split(".h")
        if "<" in head:
            head, kind = head.rstrip(">").split("<")
            return f"A{layer}.{head}.{kind.upper()}"
        return f"A{layer}.{head}"
    writer, reader = name.split("->")
    return f"{node(writer)}->{node(reader)}"


def compare(layers: int, d: int, tokens: int, batch: int, vocab: int = 100) -> bool:
    cfg = HookedTransformerConfig(n_layers=layers, d_model=d, n_ctx=64, d_head=d // 4, n_heads=4, d_mlp=4 * d,
                                  d_vocab=vocab, act_fn="gelu_new", normalization_type="LN",
                                  positional_embedding_type="standard", seed=0, dtype=torch.float64)
    tl = HookedTransformer(cfg)
    with torch.no_grad():  # random non-trivial layer norms (TransformerLens starts them at 1 and 0)
        g = torch.Generator().manual_seed(1)
        for name, p in tl.named_parameters():
            if ".ln" in name or "ln_final" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    hf = to_hf(tl)
    tl.set_use_attn_result(True)
    tl.set_use_split_qkv_input(True)
    tl.set_use_hook_mlp_in(True)

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (batch, tokens), generator=g)
    corrupt = torch.randint(0, vocab, (batch, tokens), generator=g)
    answers = torch.randint(0, vocab, (batch, 1), generator=g)
    wrong = torch.randint(0, vocab, (batch, 1), generator=g)
    with torch.no_grad():
        same = (tl(clean)[:, -1] - hf(clean).logits[:, -1]).abs().max().item()

    # clt_hub
    em = EdgeModel(hf)
    ones = torch.ones(batch, 1, dtype=torch.bool)
    b = Batch(clean, corrupt, torch.full((batch,), tokens - 1), answers, ones, wrong, ones)
    t0 = time.perf_counter()
    ours = eap_scores(em, [b], progress=False)
    ours_s = time.perf_counter() - t0

    # auto-circuit
    model = patchable_model(tl, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))
    loader = PromptDataLoader(PromptDataset(list(clean), list(corrupt), list(answers), list(wrong)), seq_len=None,
                              diverge_idx=0, batch_size=batch, shuffle=False)
    t0 = time.perf_counter()
    scores = mask_gradient_prune_scores(model, loader, None, grad_function="logit", answer_function="avg_diff",
                                        mask_val=0.0)
    peer_s = time.perf_counter() - t0
    by_name = {e.name: float(e.prune_score(scores)) for e in model.edges}

    names = em.graph.edge_names()
    missing = [n for n in names if theirs(n) not in by_name]
    their_vals = torch.tensor([-by_name[theirs(n)] for n in names if theirs(n) in by_name], dtype=torch.float64)
    our_vals = torch.tensor([float(ours[i]) for i, n in enumerate(names) if theirs(n) in by_name], dtype=torch.float64)
    diff = (their_vals - our_vals).abs().max().item()
    scale = our_vals.abs().max().item()
    k = max(1, len(our_vals) // 20)
    top_ours = set(our_vals.abs().topk(k).indices.tolist())
    top_theirs = set(their_vals.abs().topk(k).indices.tolist())
    ranks = torch.stack([our_vals.abs().argsort().argsort(), their_vals.abs().argsort().argsort()]).double()
    spearman = torch.corrcoef(ranks)[0, 1].item()
    print(f"layers={layers} d_model={d} tokens={tokens} batch={batch}: {len(names)} clt_hub edges, {len(by_name)} "
          f"auto-circuit edges, {len(missing)} unmatched; model logits agree to {same:.1e}")
    print(f"  max |score difference| {diff:.2e} (largest |score| {scale:.3g}); top-5% edges shared "
          f"{len(top_ours & top_theirs)}/{k}; Spearman of |scores| {spearman:.6f}")
    print(f"  wall time: clt_hub {ours_s:.2f} s, auto-circuit {peer_s:.2f} s")
    return not missing and diff <= 1e-6 * max(1.0, scale)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="a tiny shape, in seconds: 1 and 2 layers, d_model 32, "
                   "6 tokens, batch 2")
    args = p.parse_args()
    if args.smoke:
        args.layers, args.d_model, args.tokens, args.batch = [1, 2], 32, 6, 2
    torch.set_num_threads(1)
    ok = [compare(L, args.d_model, args.tokens, args.batch) for L in args.layers]
    print("PASS" if all(ok) else "FAIL: scores differ")
    raise SystemExit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
