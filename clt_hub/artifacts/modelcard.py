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
    repo = repo_id if repo_id and REPO_ID.fullmatch(repo_id) else "<this repo>"
    lines = [*_front_matter(cfg, layout), *_facts(cfg, layout), *_metrics(cfg), *_loading(cfg, layout, repo),
             "Written by clt_hub. Formats: circuit-tracer CLT / transcoder_set, SAE-Lens v6 cfg.json.", ""]
    return "\n".join(lines)


def _front_matter(cfg: TranscoderConfig, layout: str) -> list[str]:
    """The Hub's YAML header: library, tags and (when it is a model id) the base model."""
    kind_tag = "cross-layer-transcoder" if cfg.kind == "clt" else "per-layer-transcoder"
    front: dict[str, Any] = {
        "library_name": "saelens" if cfg.kind == "plt" and layout != "circuit-tracer" else "clt-hub",
        "tags": ["clt-hub", "transcoder", kind_tag, "circuit-tracer", "saelens", "mechanistic-interpretability"],
    }
    if MODEL_ID.fullmatch(cfg.model_name):
        front["base_model"] = cfg.model_name
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]


def _facts(cfg: TranscoderConfig, layout: str) -> list[str]:
    """The title and the table of what the transcoder is."""
    name = "Cross-layer transcoder" if cfg.kind == "clt" else "Per-layer transcoders"
    reads = _code(cfg.feature_input_hook, HOOK) + (f" ({_code(cfg.hf_hook_name, HOOK)})" if cfg.hf_hook_name else "")
    writes = _code(cfg.feature_output_hook, HOOK) + (f" ({_code(cfg.hf_hook_name_out, HOOK)})"
                                                      if cfg.hf_hook_name_out else "")
    topk = f" (k={cfg.topk})" if cfg.activation == "topk" else ""
    lines = [f"# {name} for {_text(cfg.model_name) if cfg.model_name else 'a transformers model'}", "",
             "| property | value |", "|---|---|",
             f"| kind | {cfg.kind} |", f"| layers | {cfg.n_layers} |", f"| d_model | {cfg.d_model} |",
             f"| features per layer | {cfg.d_sae} |", f"| activation | {cfg.activation}{topk} |",
             f"| skip connection | {cfg.skip} |", f"| dtype | {cfg.dtype} |",
             f"| reads | {reads} |", f"| writes | {writes} |", f"| layout | {_text(layout)} |"]
    if cfg.dataset_path:
        lines.append(f"| training data | {_text(cfg.dataset_path)} |")
    return lines


def _metrics(cfg: TranscoderConfig) -> list[str]:
    """The metrics table, when the config holds metrics."""
    if not cfg.metrics:
        return []
    return ["", "## Metrics", "", "| key | metric | value |", "|---|---|---|",
            *(f"| {_code(key, HOOK)} | {_text(metric_label(key))} | {_text(_fmt(value))} |"
              for key, value in cfg.metrics.items())]


def _loading(cfg: TranscoderConfig, layout: str, repo: str) -> list[str]:
    """How to load it: clt_hub, then SAE-Lens and circuit-tracer as the kind and layout allow."""
    lines = ["", "## Loading", "", "clt_hub:", "", "```python", "from clt_hub import Transcoder",
             f'tc = Transcoder.from_pretrained("{repo}")  # lazy=True reads decoder rows on demand', "```", ""]
    if cfg.kind == "plt" and layout != "circuit-tracer":
        return lines + ["SAE-Lens (one layer; no extra code):", "", "```python", "from sae_lens import SAE",
                        f'sae = SAE.from_pretrained("{repo}", "layer_0")', "```", "",
                        "circuit-tracer: convert first with "
                        f"`clt-hub convert {repo} out_dir --to circuit-tracer`.", ""]
    if cfg.kind == "clt":
        return lines + _loading_clt(cfg, repo)
    return lines + ["circuit-tracer (this folder is its transcoder_set layout):", "", "```python",
                    "from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set", "```", ""]


def _loading_clt(cfg: TranscoderConfig, repo: str) -> list[str]:
    """A CLT through SAE-Lens (one layer) and circuit-tracer (when its hook names are plain identifiers)."""
    lines = ["SAE-Lens (one layer: exact encoder; decoder = this layer's own l -> l block):", "",
             "```python", "from sae_lens import SAE", "from clt_hub.artifacts.saelens_loaders import clt_layer_loader",
             f'sae = SAE.from_pretrained("{repo}", "layer_0", converter=clt_layer_loader)', "```", ""]
    if all(HOOK.fullmatch(h) for h in (cfg.feature_input_hook, cfg.feature_output_hook)):
        scan = cfg.model_name if MODEL_ID.fullmatch(cfg.model_name) else "clt-hub"
        lines += ["circuit-tracer (this folder is its CLT layout):", "", "```python",
                  "from huggingface_hub import snapshot_download",
                  "from circuit_tracer.transcoder.cross_layer_transcoder import load_clt",
                  f'clt = load_clt(snapshot_download("{repo}"), scan="{scan}", '
                  f'feature_input_hook="{cfg.feature_input_hook}", feature_output_hook="{cfg.feature_output_hook}")',
                  "```", ""]
    if cfg.skip:
        lines += ["circuit-tracer does not read skip weights; they are in `W_skip_<layer>.safetensors` "
                  "([d_out, d_in], applied as `x @ W_skip.T`).", ""]
    return lines


def write_model_card(cfg: TranscoderConfig, folder: Path, layout: str, repo_id: str | None = None) -> None:
    (folder / "README.md").write_text(render(cfg, layout, repo_id))
