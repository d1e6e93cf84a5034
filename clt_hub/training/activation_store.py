"""Token-level (MLP input, MLP output) pairs for all layers, for training and evaluating transcoders.

`stream_activations` runs the model over a text source (through the model's adapter, so any
supported family works) and yields shuffled batches from a fixed-size buffer. `ActivationCache`
writes the same pairs to safetensors shards with a manifest (optionally in lower precision) so
several runs can reuse one pass of the model. Both are deterministic given their seed, which is
what makes resumed training end exactly where an uninterrupted run would.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clt_hub.config import load_json, torch_dtype
from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for
from clt_hub.models.hooks import mlp_io
from clt_hub.models.loading import context_length

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SourceConfig:
    """How text becomes activations: context length, hooks and which tokens are skipped."""

    context_size: int = 128
    input_hook: str = "hook_resid_mid"
    output_hook: str = "hook_mlp_out"
    model_batch: int = 8          # sequences per model forward
    min_tokens: int = 2           # texts shorter than this (after tokenizing) are skipped

    def validate(self, model: nn.Module) -> None:
        adapter = adapter_for(model)
        for hook in (self.input_hook, self.output_hook):
            adapter.hook_point(hook)  # raises with the supported list
        limit = context_length(model)
        if limit is not None and self.context_size > limit:
            raise ConfigError(f"context_size {self.context_size} exceeds the model's context of {limit}")
        if self.context_size < 2:
            raise ConfigError("context_size must be at least 2 tokens")


def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def token_chunks(texts: Iterable[str], tokenizer: Any, context_size: int, min_tokens: int = 2) -> Iterator[list[int]]:
    """Each text tokenized (with the tokenizer's BOS convention) and cut into context-size pieces.

    Texts from `clt_hub.texts` are checked already; one handed in directly that is not a string, or not
    valid Unicode (a lone surrogate), is a ConfigError naming its position instead of the tokenizer's TypeError."""
    for i, text in enumerate(texts, 1):
        try:
            ids = tokenizer(text)["input_ids"]
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
            if not isinstance(text, str):
                raise ConfigError(f"text {i} is a {type(text).__name__}, not a string") from None
            if not text.isascii() and any("\ud800" <= c <= "\udfff" for c in text):
                raise ConfigError(f"text {i} is not valid Unicode (it holds a lone surrogate); read texts with "
                                  "clt_hub.texts.iter_texts(..., bad_records='skip') to leave such "
                                  "records out") from None
            raise ConfigError(f"text {i} cannot be tokenized: {exc}") from None
        for start in range(0, len(ids), context_size):
            piece = ids[start:start + context_size]
            if len(piece) >= min_tokens:
                yield piece


@torch.no_grad()
def model_activations(model: nn.Module, tokenizer: Any, texts: Iterable[str], cfg: SourceConfig,
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of shape [n_tokens, n_layers, d_model] per model batch; BOS/pad/special tokens dropped."""
    cfg.validate(model)
    special = _special_ids(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    pending: list[list[int]] = []
    seen_any = False

    def run(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(b) for b in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, b in enumerate(batch):
            ids[i, :len(b)] = torch.tensor(b)
            mask[i, :len(b)] = 1
        x, y = mlp_io(model, ids, cfg.input_hook, cfg.output_hook, attention_mask=mask)
        keep = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special) or [-1]))
        return x[keep].float(), y[keep].float()

    for chunk in token_chunks(texts, tokenizer, cfg.context_size, cfg.min_tokens):
        seen_any = True
        pending.append(chunk)
        if len(pending) == cfg.model_batch:
            yield run(pending)
            pending = []
    if pending:
        yield run(pending)
    if not seen_any:
        raise ConfigError(f"the dataset gave no text of at least {cfg.min_tokens} tokens; check the path, "
                          "the text field, or lower min_tokens")


def shuffled_batches(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int, buffer_tokens: int,
                     seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Token-level shuffle through a buffer: tokens of one document do not arrive together."""
    g = torch.Generator().manual_seed(seed)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    for x, y in pairs:
        xs.append(x)
        ys.append(y)
        held += len(x)
        if held >= buffer_tokens:
            bx, by = torch.cat(xs), torch.cat(ys)
            perm = torch.randperm(len(bx), generator=g)
            bx, by = bx[perm], by[perm]
            n_out = (len(bx) // 2 // batch_size) * batch_size  # emit half, keep half to mix with new text
            for i in range(0, n_out, batch_size):
                yield bx[i:i + batch_size], by[i:i + batch_size]
            xs, ys, held = [bx[n_out:]], [by[n_out:]], len(bx) - n_out
    if xs:
        bx, by = torch.cat(xs), torch.cat(ys)
        perm = torch.randperm(len(bx), generator=g)
        bx, by = bx[perm], by[perm]
        for i in range(0, len(bx) - batch_size + 1, batch_size):
            yield bx[i:i + batch_size], by[i:i + batch_size]


SHARD_BYTES = 512 * 2**20  # the most one shard may take in memory as float32 x and y


class ActivationCache:
    """Activations on disk: shard_00000.safetensors ... with x, y [n, L, d] and a manifest."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{self.folder} is not an activation cache (no {MANIFEST}); build one with "
                              "ActivationCache.build or `clt-hub train --cache-dir`")
        fix = f"delete {self.folder} and build the cache again"
        self.manifest = load_json(path, what="cache manifest", fix=fix)
        shards = self.manifest.get("shards") if isinstance(self.manifest, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
                and s["file"] not in ("", ".", "..")
                and isinstance(s.get("n_tokens"), int) and s["n_tokens"] >= 0 for s in shards):
            raise ConfigError(f"{path}: not an activation cache manifest (it lists 'shards', each a file name in "
                              f"the folder and its n_tokens); {fix}")
        self.shards: list[dict[str, Any]] = shards
        self.n_tokens = sum(s["n_tokens"] for s in self.shards)

    @staticmethod
    def build(model: nn.Module, tokenizer: Any, texts: Iterable[str], folder: str | Path, n_tokens: int,
              cfg: SourceConfig = SourceConfig(), shard_tokens: int | None = None, dtype: str = "float32",
              progress: bool = False) -> ActivationCache:
        """Run the model until `n_tokens` pairs are stored. Shards are written atomically, manifest last.
        `shard_tokens` None: 65,536 tokens, or fewer where a shard read back as float32 (x and y) would pass
        SHARD_BYTES (a real model's 18 layers of 640 dimensions: 5,825 tokens), so reading stays in memory."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm


        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        dt = torch_dtype(dtype)
        shards: list[dict[str, Any]] = []
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        held = total = 0
        bar = tqdm(total=n_tokens, desc="caching activations", unit="tok", disable=not progress)

        def flush() -> None:
            nonlocal xs, ys, held
            if not held:
                return
            name = f"shard_{len(shards):05d}.safetensors"
            tmp = out / (name + ".tmp")
            save_file({"x": torch.cat(xs).to(dt).contiguous(), "y": torch.cat(ys).to(dt).contiguous()}, str(tmp))
            tmp.replace(out / name)
            shards.append({"file": name, "n_tokens": held})
            xs, ys, held = [], [], 0

        for x, y in model_activations(model, tokenizer, texts, cfg):
            if shard_tokens is None:
                shard_tokens = max(1, min(65536, SHARD_BYTES // (8 * x[0].numel())))
            take = min(len(x), n_tokens - total)
            xs.append(x[:take])
            ys.append(y[:take])
            held += take
            total += take
            bar.update(take)
            if held >= shard_tokens:
                flush()
            if total >= n_tokens:
                break
        flush()
        bar.close()
        manifest = {"format": "clt_hub.transcoders.activations/1", "n_tokens": total, "dtype": dtype,
                    "n_layers": adapter_for(model).n_layers(model), "d_model": int(model.config.hidden_size),  # type: ignore[union-attr,arg-type]
                    "model": getattr(model.config, "_name_or_path", ""), "source": asdict(cfg), "shards": shards}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return ActivationCache(out)

    def batches(self, batch_size: int, seed: int, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled within and across shards (shard order and token order both permuted per epoch)."""
        from safetensors.torch import load_file

        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        carry: tuple[torch.Tensor, torch.Tensor] | None = None
        for i in order:
            data = load_file(str(self.folder / self.shards[i]["file"]))
            x, y = data["x"].float(), data["y"].float()
            if carry is not None:
                x, y = torch.cat([carry[0], x]), torch.cat([carry[1], y])
            perm = torch.randperm(len(x), generator=g)
            x, y = x[perm], y[perm]
            n = (len(x) // batch_size) * batch_size
            for s in range(0, n, batch_size):
                yield x[s:s + batch_size], y[s:s + batch_size]
            carry = (x[n:], y[n:])
