"""Tiny random models saved as model folders, for the `--smoke` runs of the scripts in benchmarks/ and crosschecks/:
the same code path as a real model's run (a folder that `clt_hub.load_model` reads), in seconds, offline.

Not a benchmark itself (the leading underscore keeps it out of the scripts the tests run)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")


def word_tokenizer(texts: Iterable[str]) -> Any:
    """One token per whitespace-separated word of `texts` (BOS prepended), so none of their words is unknown
    (clt_hub refuses prompts with unknown words) and a name with a leading space is a single token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.split()} - set(SPECIALS))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*SPECIALS, *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model(family: str, vocab: int, n_layers: int = 2, d_model: int = 32, seed: int = 0) -> Any:
    """A random `family` causal LM ("gemma3": Gemma-3-270M's family, "llama": SmolLM2's), eager attention."""
    import transformers as T

    shape: dict[str, Any] = {"num_hidden_layers": n_layers, "hidden_size": d_model, "intermediate_size": 2 * d_model,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": d_model // 4, "vocab_size": vocab,
             "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if family == "gemma3":  # sliding-window layers (a window shorter than the prompts) and a global one, as Gemma-3's
        config: Any = T.Gemma3TextConfig(**shape, query_pre_attn_scalar=d_model // 4, sliding_window=4,
                                          layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    elif family == "llama":
        config = T.LlamaConfig(**shape)
    else:
        raise ValueError(f"no tiny {family!r} model (gemma3, llama)")
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def save_tiny_model(folder: Path, family: str, texts: Iterable[str], n_layers: int = 2, d_model: int = 32) -> str:
    """`tiny_model` with a word tokenizer over `texts`, saved into `folder`; returns the folder, a model name
    for `clt_hub.load_model`."""
    tokenizer = word_tokenizer(texts)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(family, len(tokenizer), n_layers, d_model).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)
