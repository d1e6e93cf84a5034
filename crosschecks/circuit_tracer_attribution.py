"""clt_hub vs circuit-tracer attribution on the same random GPT-2-shaped model and the same CLT.

Runs in circuit-tracer's venv (`python3 -m nox -s peer`). circuit-tracer gets a TransformerLens
model from `ReplacementModel.from_config`; its random weights are copied into a Hugging Face GPT-2
for clt_hub, so both tools trace the very same network. Prints max |adjacency difference|, the score
differences, and wall time / peak memory side by side. `--smoke`: one tiny shape, in seconds (a check that the
code path runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import transformers as T  # noqa: E402
from _graphs import bos_errors_zeroed  # noqa: E402
from circuit_tracer.attribution.attribute import attribute as ct_attribute  # noqa: E402
from circuit_tracer.graph import compute_graph_scores  # noqa: E402
from circuit_tracer.replacement_model.replacement_model_transformerlens import (  # noqa: E402
    TransformerLensReplacementModel,
)
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from helpers import random_transcoder  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from clt_hub.attribution.attribute import attribute  # noqa: E402
from clt_hub.attribution.pruning import scores  # noqa: E402
from clt_hub.models.hooks import mlp_io  # noqa: E402

R = TypeVar("R")

def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def to_hf(rm: TransformerLensReplacementModel, cfg: HookedTransformerConfig) -> torch.nn.Module:
    """The TransformerLens GPT-2-style weights as a transformers GPT2LMHeadModel."""
    hf_cfg = T.GPT2Config(n_layer=cfg.n_layers, n_embd=cfg.d_model, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
                          vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx, activation_function="gelu_new",
                          layer_norm_epsilon=cfg.eps, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0)
    hf_cfg._attn_implementation = "eager"
    hf = T.GPT2LMHeadModel(hf_cfg).eval()
    sd = rm.state_dict()
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
            block.mlp.c_fc.weight.copy_(sd[p + "mlp.old_mlp.W_in"])
            block.mlp.c_fc.bias.copy_(sd[p + "mlp.old_mlp.b_in"])
            block.mlp.c_proj.weight.copy_(sd[p + "mlp.old_mlp.W_out"])
            block.mlp.c_proj.bias.copy_(sd[p + "mlp.old_mlp.b_out"])
        hf.transformer.ln_f.weight.copy_(sd["ln_final.w"])
        hf.transformer.ln_f.bias.copy_(sd["ln_final.b"])
        hf.lm_head.weight.copy_(sd["unembed.old_unembed.W_U"].T)
        assert sd["unembed.old_unembed.b_U"].abs().max() == 0
    return hf


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<bos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")


def measure(fn: Callable[[], R], repeats: int = 3) -> tuple[R, float, float]:
    times, peaks = [], []
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")
        base = _status("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM") - base)
    return out, statistics.median(times), max(peaks)


def compare(L: int, d: int, d_sae: int, T_len: int, density: float, vocab: int = 512) -> bool:
    """One side-by-side run; `density` is the fraction of (token, layer, feature) activations that are on."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=L, d_model=d, n_ctx=512, d_head=d // 4, n_heads=4, d_mlp=4 * d,
                                  d_vocab=vocab, act_fn="gelu_new", normalization_type="LN",
                                  positional_embedding_type="standard", seed=0)
    tc = random_transcoder("clt", n_layers=L, d_model=d, d_sae=d_sae, seed=1)
    folder = Path(tempfile.mkdtemp()) / "clt"
    tc.save_pretrained(folder)  # thresholds are set below, on both copies
    clt = load_clt(str(folder), scan="crosschecks", feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out",
                   lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
    rm = TransformerLensReplacementModel.from_config(cfg, clt)
    rm.tokenizer = _tokenizer(cfg.d_vocab)  # circuit-tracer looks up special tokens (BOS) through it
    hf = to_hf(rm, cfg)
    ids = torch.randint(1, vocab, (T_len,))
    ids[0] = 0
    # thresholds at the (1 - density) quantile of this prompt's pre-activations: realistic sparsity
    x, _ = mlp_io(hf, ids[None])
    with torch.no_grad():
        for l in range(L):
            q = torch.quantile(tc.pre_activations(x[0, 1:, l], l).flatten(), 1 - density).item()
            tc.threshold[l].fill_(q)
            rm.transcoders.activation_function.threshold[l].fill_(q)
        same = (hf(ids[None]).logits - rm(ids[None])).abs().max().item()
    print(f"HF copy vs TransformerLens logits: max |diff| {same:.2e}")

    theirs, t_time, t_mem = measure(lambda: ct_attribute(ids, rm, batch_size=64, verbose=False))
    ours, o_time, o_mem = measure(lambda: attribute(hf, tc, ids, batch_size=64))
    # align circuit-tracer's node order with ours via (layer, pos, feature)
    their_feats = theirs.active_features[theirs.selected_features].tolist()
    our_index = {tuple(f): i for i, f in enumerate(ours.features.tolist())}
    assert len(their_feats) == ours.n_features, (len(their_feats), ours.n_features)
    perm = [our_index[tuple(f)] for f in their_feats] + list(range(ours.n_features, ours.adjacency.shape[0]))
    ours_in_their_order = ours.adjacency[perm][:, perm]
    diff = (ours_in_their_order - theirs.adjacency_matrix.float()).abs()
    scale = theirs.adjacency_matrix.abs().max().item()
    # Convention difference: circuit-tracer zeroes the error vectors at position 0 (BOS) as well as the
    # features there, so those MLP outputs are constants for it; clt_hub keeps them as error nodes so
    # that every value still equals the sum of its edges. Compare everything else, and report those.
    bos_errors = [ours.error_index(l, 0) for l in range(L)]
    rest = torch.ones(diff.shape[1], dtype=torch.bool)
    rest[bos_errors] = False
    adj_diff = diff[:, rest].max().item()
    bos_diff = diff[:, bos_errors].max().item()
    s_ours, s_theirs = scores(bos_errors_zeroed(ours)), compute_graph_scores(theirs)
    print(f"prompt {T_len} tokens, CLT {L} layers x {tc.d_sae} features, {ours.n_features} active features, "
          f"{ours.n_logits} logits")
    print(f"max |adjacency diff| {adj_diff:.2e} (largest edge {scale:.2e}; relative {adj_diff / scale:.1e})")
    print(f"BOS error-node columns (kept by clt_hub, zeroed by circuit-tracer): largest clt_hub edge {bos_diff:.2e}")
    rep_diff = abs(s_ours.replacement - s_theirs[0])
    comp_diff = abs(s_ours.completeness - s_theirs[1])
    print(f"scores with circuit-tracer's BOS convention: replacement {s_ours.replacement:.6f} vs {s_theirs[0]:.6f}, "
          f"completeness {s_ours.completeness:.6f} vs {s_theirs[1]:.6f} (max diff {max(rep_diff, comp_diff):.1e})")
    s_native = scores(ours)
    print(f"clt_hub's own scores (BOS errors counted): replacement {s_native.replacement:.6f}, "
          f"completeness {s_native.completeness:.6f}")
    print(f"{'':14}{'wall s':>10}{'peak MiB':>10}")
    print(f"{'circuit-tracer':14}{t_time:10.3f}{t_mem:10.1f}")
    print(f"{'clt_hub':14}{o_time:10.3f}{o_mem:10.1f}")
    print(f"clt_hub/circuit-tracer: time {o_time / t_time:.2f}x, memory {o_mem / max(t_mem, 1e-9):.2f}x")
    ok = adj_diff <= 1e-4 * max(scale, 1.0) and max(rep_diff, comp_diff) < 1e-4
    print("OK: identical graphs within 1e-4" if ok else "FAILED: graphs differ")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="one tiny shape (2 layers, d_model 32, 8 tokens)")
    shapes = [{"L": 4, "d": 64, "d_sae": 256, "T_len": 24, "density": 0.3},
              {"L": 6, "d": 256, "d_sae": 2048, "T_len": 48, "density": 0.01},
              {"L": 6, "d": 256, "d_sae": 2048, "T_len": 96, "density": 0.005}]
    if ap.parse_args().smoke:
        shapes = [{"L": 2, "d": 32, "d_sae": 64, "T_len": 8, "density": 0.3}]
    ok = True
    for shape in shapes:
        print("\n" + ", ".join(f"{k}={v}" for k, v in shape.items()))
        ok = compare(**shape) and ok  # type: ignore[arg-type]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
