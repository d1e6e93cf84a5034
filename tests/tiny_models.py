"""Tiny random causal LMs of every supported family, built from configs offline."""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("gpt2", "llama", "gemma2", "gemma3", "qwen2", "qwen3")


def tiny_model(family: str, n_layers: int = 3, d_model: int = 32, vocab: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = {"num_hidden_layers": n_layers, "hidden_size": d_model, "intermediate_size": 2 * d_model,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, vocab_size=vocab, n_positions=64,
                           bos_token_id=0, eos_token_id=1)
    elif family == "llama":
        cfg = T.LlamaConfig(**common)
    elif family == "gemma2":
        cfg = T.Gemma2Config(**common, head_dim=d_model // 4, final_logit_softcapping=30.0,
                             attn_logit_softcapping=50.0, query_pre_attn_scalar=d_model // 4, sliding_window=8)
    elif family == "gemma3":  # sliding-window layers with a window shorter than the test prompts, and a full one
        layer_types = (["sliding_attention"] * (n_layers - 1) + ["full_attention"])
        cfg = T.Gemma3TextConfig(**common, head_dim=d_model // 4, query_pre_attn_scalar=d_model // 4, sliding_window=4,
                                 layer_types=layer_types)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**common)
    elif family == "qwen3":
        cfg = T.Qwen3Config(**common, head_dim=d_model // 4)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg)
    # random norm weights too, so a misplaced norm cannot hide behind weight 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()
