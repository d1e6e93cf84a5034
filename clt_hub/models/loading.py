"""Loading a language model (+ tokenizer, + transcoder) and the checks every entry point shares."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt_hub.config import load_json, torch_dtype
from clt_hub.errors import ArtifactError, ConfigError, HubError
from clt_hub.models.adapters import adapter_for
from clt_hub.transcoders.transcoder import Transcoder

LAZY_ABOVE_BYTES = 256 * 2**20  # lazy="auto" leaves decoders on disk for CLTs bigger than this


def _looks_like_transcoder(path: Path) -> bool:
    return (path / "config.yaml").exists() or (path / "cfg.json").exists() or any(path.glob("layer_*/cfg.json"))


def _check_model_folder(path: Path) -> None:
    """A local folder given as a model must hold a transformers config; say what it holds instead."""
    config = path / "config.json"
    data = load_json(config, what="model config", fix="fix it or download the model again") if config.is_file() else None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type:
        if not any(path.glob("*.safetensors")):
            pickles = sorted(p.name for p in path.glob("*.bin")) or ["no weights file"]
            raise ConfigError(f"{path} has no .safetensors weights ({', '.join(pickles)}); clt_hub loads only "
                              "safetensors, never pickles (a pickled .bin file can run code when loaded). Convert "
                              "it once where you trust it: AutoModelForCausalLM.from_pretrained(folder)"
                              ".save_pretrained(folder, safe_serialization=True)")
        return
    if _looks_like_transcoder(path):
        raise ConfigError(f"{path} holds a transcoder, not a language model; pass it as --transcoder and give "
                          "the model's folder or Hub id as --model")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise ConfigError(f"{path} is not a transformers model folder: it has no config.json with a model_type "
                      f"(found: {found}). Give a folder written by save_pretrained, or a Hub model id")


def check_loading_info(info: dict[str, Any], source: str) -> None:
    """Refuse a model whose weights file lacks tensors its config needs, or holds them in other shapes:
    transformers would fill those with random values and go on (a warning, exit 0, wrong results)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if not missing and not mismatched:
        return
    parts = []
    for what, keys in (("missing", missing), ("in another shape than its config says", mismatched)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            parts.append(f"{len(keys)} weight(s) {what}: {shown}")
    raise ArtifactError(f"{source}: {'; '.join(parts)}. The weights file is incomplete or belongs to another "
                        "model; nothing was loaded. Download or convert the model again, or fix its config.json")


def load_model(name_or_path: str, local_files_only: bool = False, dtype: str = "float32") -> tuple[Any, Any]:
    """A `transformers` causal LM (eager attention, eval mode) and its tokenizer, with errors that say
    what to do. Takes a folder, a Hub id (failing fast when the Hub cannot be reached), a known model name
    (`clt_hub.models.known`: e.g. gemma-3-270m, installed from the package registry) or a .gguf file."""
    import transformers as T

    from clt_hub.artifacts.hub import offline_if_unreachable
    from clt_hub.models.known import check_tokenizer, resolve_model, unknown_model_hint

    name = name_or_path
    name_or_path = resolve_model(name_or_path)
    path = Path(name_or_path).expanduser()

    if path.is_dir():
        _check_model_folder(path)
    elif not local_files_only:
        try:
            local_files_only = offline_if_unreachable(name_or_path, "model")
        except HubError as exc:
            raise HubError(f"{exc}{unknown_model_hint(name_or_path)}") from None
    try:
        config = T.AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise HubError(f"model {name_or_path!r} is not available: not a local folder, not in the Hub cache, or "
                       f"the Hub is unreachable ({str(exc).splitlines()[0]}). Download it once with network, "
                       f"or pass a local folder{unknown_model_hint(name_or_path)}") from None
    adapter_for(config)  # unsupported architectures fail here, before any weights load
    loaded: Any = T.AutoModelForCausalLM.from_pretrained(  # (model, loading info): typed as the model alone
        name_or_path, local_files_only=local_files_only, dtype=torch_dtype(dtype), attn_implementation="eager",
        use_safetensors=True,  # never unpickle a .bin
        output_loading_info=True, ignore_mismatched_sizes=True)  # both checked here, by name, instead
    model, info = loaded
    check_loading_info(info, f"model {name}")
    tokenizer = T.AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    check_tokenizer(name, tokenizer)
    return model.eval(), tokenizer


def load_transcoder(name_or_path: str | os.PathLike[str], local_files_only: bool = False,
                    lazy: bool | str = "auto") -> Transcoder:
    """A transcoder from a folder, Hub repo id or registry name. `lazy="auto"` leaves the decoders of big
    CLTs on disk (the layout must allow it); True/False force it."""
    from clt_hub.artifacts.hub import folder_size, resolve
    from clt_hub.artifacts.layouts import detect

    path = resolve(name_or_path, local_files_only=local_files_only)
    if lazy == "auto":
        lazy = detect(path) == "circuit-tracer-clt" and folder_size(path) > LAZY_ABOVE_BYTES
    return Transcoder.from_pretrained(path, lazy=bool(lazy))


def load(model: str, transcoder: str | os.PathLike[str], local_files_only: bool = False,
         lazy: bool | str = "auto") -> tuple[Any, Any, Transcoder]:
    """Model, tokenizer and transcoder, checked to belong together: what every front end loads. The
    transcoder comes first: it is quick to find or refuse, while a known model may first be converted
    (about a minute), which an unreachable transcoder would waste."""
    tc = load_transcoder(transcoder, local_files_only=local_files_only, lazy=lazy)
    lm, tokenizer = load_model(model, local_files_only=local_files_only)
    check_compatible(lm, tc)
    return lm, tokenizer, tc


# A prompt is refused by its length in characters before any tokenizer sees it (tokenising a 10 MB text took
# 1.45 GB): at most CHARS_PER_TOKEN characters per token of the model's context (English averages about 4
# characters a token, so only a prompt far longer than the context is refused this way) and never more than
# MAX_PROMPT_CHARS (about 250,000 tokens of English), whatever the context, or when it is not known.
CHARS_PER_TOKEN = 16
MAX_PROMPT_CHARS = 1_000_000


def check_prompt_text(prompt: str, context: int | None = None) -> None:
    """A prompt that is text, not empty, and not so long in characters that it cannot fit in a context of
    `context` tokens (see CHARS_PER_TOKEN); checked before it is tokenised."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty; give some text")
    limit = MAX_PROMPT_CHARS if context is None else min(MAX_PROMPT_CHARS, context * CHARS_PER_TOKEN)
    if len(prompt) > limit:
        why = ("" if limit == MAX_PROMPT_CHARS else
               f" ({CHARS_PER_TOKEN} per token of the model's {context:,}-token context)")
        raise ConfigError(f"the prompt is {len(prompt):,} characters long; clt_hub takes at most {limit:,}{why}, "
                          "so it was not tokenised. Shorten the prompt")


def encode_prompt(tokenizer: Any, prompt: str, context: int | None = None) -> torch.Tensor:
    """Token ids of a prompt (with the tokenizer's BOS convention), refusing a prompt longer than the model's
    `context` (in characters before it is tokenised, see `check_prompt_text`, then in tokens) and words the
    tokenizer does not know: a word-level vocabulary would silently read them as its unknown token."""
    check_prompt_text(prompt, context)
    ids: list[int] = tokenizer(prompt)["input_ids"]
    if context is not None and len(ids) > context:
        raise ConfigError(f"the prompt has {len(ids):,} tokens but the model's context is {context:,}; "
                          "shorten the prompt")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        unknown = _unknown_words(tokenizer, prompt, unk)
        if unknown:
            vocab = getattr(tokenizer, "vocab_size", None)
            raise ConfigError(f"the prompt has word(s) this tokenizer does not know: {', '.join(map(repr, unknown))} "
                              f"(its vocabulary has {vocab} entries; they would all read as {tokenizer.unk_token!r}). "
                              "Use words from the model's vocabulary")
    return torch.tensor(ids, dtype=torch.long)


def _unknown_words(tokenizer: Any, prompt: str, unk: int) -> list[str]:
    """The pieces of `prompt` that encode to the unknown token (by character offsets where the tokenizer gives
    them, else word by word)."""
    try:
        enc = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
        return [prompt[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
                if t == unk and b > a]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        return [w for w in prompt.split() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]


def context_length(model: nn.Module | Any) -> int | None:
    """The longest sequence a model takes, from the model or from its transformers config alone (read without
    the weights): max_position_embeddings, or GPT-2's n_positions, of the config or of its text part (a
    multimodal config such as Gemma-3's); None if the config does not say."""
    cfg: Any = model.config if hasattr(model, "config") else model
    configs = [cfg]
    if hasattr(cfg, "get_text_config"):
        configs.append(cfg.get_text_config())
    for config in configs:
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_compatible(model: nn.Module, tc: Transcoder) -> None:
    """The transcoder was made for a model of this depth and width."""
    adapter = adapter_for(model)
    n = adapter.n_layers(model)
    d = model.config.hidden_size  # type: ignore[union-attr]
    if (tc.n_layers, tc.d_model) != (n, d):
        raise ConfigError(f"transcoder has n_layers={tc.n_layers}, d_model={tc.d_model} but the model has "
                          f"{n} layers and hidden size {d}; use a transcoder trained for this model")


def check_prompt(model: nn.Module, ids: torch.Tensor) -> None:
    """Token ids a forward pass can take: not empty, within the context, within the vocabulary."""
    if ids.numel() == 0:
        raise ConfigError("the prompt is empty; give at least one token")
    limit = context_length(model)
    if limit is not None and ids.shape[-1] > limit:
        raise ConfigError(f"the prompt has {ids.shape[-1]:,} tokens but the model's context is {limit:,}; "
                          "shorten the prompt")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(f"token ids must be in 0..{vocab - 1}; was the prompt tokenized for another model?")
