"""Model cards: Hub front matter plus the facts and loading snippets a user looks for first."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import yaml

from clt_hub.config import TranscoderConfig

METRIC_LABELS = {
    "eval_tokens": "Held-out tokens evaluated",
    "nmse": "Normalised MSE (mean over layers)",
    "fvu": "Fraction of variance unexplained (held out, mean over layers)",
    "l0_per_layer": "L0: active features per token and layer (held out)",
    "l0": "L0: active features per token and layer (last training batches)",
    "dead_fraction": "Dead features: never fired on the held-out tokens (fraction)",
    "dense_fraction": "Dense features: fire on more than 10% of held-out tokens (fraction)",
    "next_token_agreement": "Replacement-model next-token agreement",
    "kl": "KL(real || replacement), nats/token",
    "ce_original": "CE loss of the model",
    "ce_replaced": "CE loss with every MLP replaced",
    "ce_zero_ablated": "CE loss with every MLP zeroed",
    "ce_recovered": "Fraction of CE loss recovered",
    "ce_loss_recovered": "Fraction of CE loss recovered",
    "train_tokens": "Training tokens",
    "data_source": "Training text: where it comes from",
    "data_license": "Training text: licence",
    "train_dead_fraction": "Dead features at the end of training: silent for dead_after_tokens or, in a shorter run, all of it (fraction)",
    "dead": "Dead features at the end of training (fraction)",
    "skipped_records": "Bad training records left out (bad_records: skip)",
    "eval_skipped_records": "Bad held-out records left out",
}


def metric_label(key: str) -> str:
    """What a metric key means, for model cards and `clt-hub info`."""
    return METRIC_LABELS.get(key, key)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
HOOK = re.compile(r"[A-Za-z0-9_.{}:]{1,200}")


def _text(value: Any) -> str:
    """A config value as Markdown text: no HTML, no table break, no emphasis, link or code span."""
    out = html.escape(" ".join(str(value).split()), quote=False)
    for ch in "\\`*_[]|!~":
        out = out.replace(ch, "\\" + ch)
    return out


def _code(value: str, pattern: re.Pattern[str]) -> str:
    """An identifier as inline code when it is one, else as escaped text."""
    return f"`{value}`" if pattern.fullmatch(value) else _text(value)


def render(cfg: TranscoderConfig, layout: str, repo_id: str | None = None) -> str:
    """The card. Every config field is escaped, and code snippets are built only from values that match an
    identifier pattern (repo ids, hook names): a crafted config cannot write HTML, links or code."""
    kind_tag = "cross-layer-transcoder" if cfg.kind == "clt" else "per-layer-transcoder"
    front: dict[str, Any] = {
        "library_name": "saelens" if cfg.kind == "plt" and layout != "circuit-tracer" else "clt-hub",
        "tags": ["clt-hub", "transcoder", kind_tag, "circuit-tracer", "saelens", "mechanistic-interpretability"],
    }
    model_ok = bool(MODEL_ID.fullmatch(cfg.model_name))
    if model_ok:
        front["base_model"] = cfg.model_name
    repo = repo_id if repo_id and REPO_ID.fullmatch(repo_id) else "<this repo>"
    hooks_ok = all(HOOK.fullmatch(h) for h in (cfg.feature_input_hook, cfg.feature_output_hook))
    name = "Cross-layer transcoder" if cfg.kind == "clt" else "Per-layer transcoders"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name} for {_text(cfg.model_name) if cfg.model_name else 'a transformers model'}", "",
             "| property | value |", "|---|---|",
             f"| kind | {cfg.kind} |", f"| layers | {cfg.n_layers} |", f"| d_model | {cfg.d_model} |",
             f"| features per layer | {cfg.d_sae} |", f"| activation | {cfg.activation}"
             + (f" (k={cfg.topk})" if cfg.activation == "topk" else "") + " |",
             f"| skip connection | {cfg.skip} |", f"| dtype | {cfg.dtype} |",
             f"| reads | {_code(cfg.feature_input_hook, HOOK)}"
             + (f" ({_code(cfg.hf_hook_name, HOOK)})" if cfg.hf_hook_name else "") + " |",
             f"| writes | {_code(cfg.feature_output_hook, HOOK)}"
             + (f" ({_code(cfg.hf_hook_name_out, HOOK)})" if cfg.hf_hook_name_out else "") + " |",
             f"| layout | {_text(layout)} |"]
    if cfg.dataset_path:
        lines.append(f"| training data | {_text(cfg.dataset_path)} |")
    if cfg.metrics:
        lines += ["", "## Metrics", "", "| key | metric | value |", "|---|---|---|"]
        for key, value in cfg.metrics.items():
            lines.append(f"| {_code(key, HOOK)} | {_text(metric_label(key))} | {_text(_fmt(value))} |")
    lines += ["", "## Loading", "", "clt_hub:", "", "```python", "from clt_hub import Transcoder",
              f'tc = Transcoder.from_pretrained("{repo}")  # lazy=True reads decoder rows on demand', "```", ""]
    if cfg.kind == "plt" and layout != "circuit-tracer":
        lines += ["SAE-Lens (one layer; no extra code):", "", "```python", "from sae_lens import SAE",
                  f'sae = SAE.from_pretrained("{repo}", "layer_0")', "```", "",
                  "circuit-tracer: convert first with "
                  f"`clt-hub convert {repo} out_dir --to circuit-tracer`.", ""]
    elif cfg.kind == "clt":
        lines += ["SAE-Lens (one layer: exact encoder; decoder = this layer's own l -> l block):", "",
                  "```python", "from sae_lens import SAE", "from clt_hub.artifacts.saelens_loaders import clt_layer_loader",
                  f'sae = SAE.from_pretrained("{repo}", "layer_0", converter=clt_layer_loader)', "```", ""]
        if hooks_ok:
            lines += ["circuit-tracer (this folder is its CLT layout):", "", "```python",
                      "from huggingface_hub import snapshot_download",
                      "from circuit_tracer.transcoder.cross_layer_transcoder import load_clt",
                      f'clt = load_clt(snapshot_download("{repo}"), scan="{cfg.model_name if model_ok else "clt-hub"}", '
                      f'feature_input_hook="{cfg.feature_input_hook}", feature_output_hook="{cfg.feature_output_hook}")',
                      "```", ""]
        if cfg.skip:
            lines += ["circuit-tracer does not read skip weights; they are in `W_skip_<layer>.safetensors` "
                      "([d_out, d_in], applied as `x @ W_skip.T`).", ""]
    else:
        lines += ["circuit-tracer (this folder is its transcoder_set layout):", "", "```python",
                  "from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set", "```", ""]
    lines += ["Written by clt_hub. Formats: circuit-tracer CLT / transcoder_set, SAE-Lens v6 cfg.json.", ""]
    return "\n".join(lines)


def write_model_card(cfg: TranscoderConfig, folder: Path, layout: str, repo_id: str | None = None) -> None:
    (folder / "README.md").write_text(render(cfg, layout, repo_id))
