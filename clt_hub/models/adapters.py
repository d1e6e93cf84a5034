"""Where each model family keeps its MLPs, norms, embeddings and unembedding.

A family is one declarative `ModelAdapter` entry; tracing, training and interventions only ever
ask an adapter, never branch on the architecture. Adding a family = one entry + its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from clt_hub.errors import ConfigError

Side = Literal["input", "output"]


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]
    layers: str                      # ModuleList of blocks, from the CausalLM root
    embed: str                       # token embedding
    final_norm: str
    attn: str                        # the rest relative to one block
    attn_norms: tuple[str, ...]      # norms applied around attention
    mlp_in_norm: str                 # its output is the MLP input
    mlp: str = "mlp"
    mlp_out_norm: str | None = None  # Gemma-2 normalises the MLP output before the residual add
    unembed: str = "lm_head"
    softcap_field: str | None = None  # config field of a final logit tanh softcap
    embed_scale_sqrt_d: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
    norm_kind: str = "rmsnorm"       # layernorm | rmsnorm (x * w) | gemma_rmsnorm (x * (1 + w))
    # attention internals, relative to `attn` (component-level circuits, clt_hub.circuits): the projections
    # that read the attention input (separate q/k/v, or one fused module with [q | k | v] columns), the output
    # projection, and a norm applied to the attention output before the residual add (Gemma-2/3)
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attn_out: str = "o_proj"
    attn_out_norm: str | None = None  # relative to a block, like attn_norms

    def hook_point(self, hook: str) -> tuple[str, Side]:
        """TransformerLens-style hook name -> (module path relative to a block, input|output)."""
        points: dict[str, tuple[str, Side]] = {
            "hook_resid_mid": (self.mlp_in_norm, "input"),
            "ln2.hook_normalized": (self.mlp_in_norm, "output"),
            "mlp.hook_in": (self.mlp, "input"),
            "mlp.hook_out": (self.mlp, "output"),
            "hook_mlp_out": (self.mlp_out_norm or self.mlp, "output"),
        }
        if hook not in points:
            raise ConfigError(f"hook {hook!r} is not supported for {self.family}; supported: {', '.join(points)}")
        return points[hook]

    def layer_points(self, hook: str, n_layers: int) -> list[tuple[str, Side]]:
        """Where `hook` sits in each of the first `n_layers` blocks: (absolute module path, side)."""
        module, side = self.hook_point(hook)
        return [(f"{self.layers}.{l}.{module}", side) for l in range(n_layers)]

    def hf_hook_name(self, hook: str) -> str:
        """Hugging Face module path template (with {layer}) for a hook, as stored in artifacts."""
        module, side = self.hook_point(hook)
        return f"{self.layers}.{{layer}}.{module}" + (":input" if side == "input" else "")

    def norm_paths(self, model: nn.Module) -> list[str]:
        """Every norm on the residual path, as absolute module paths (frozen in the replacement model)."""
        paths = [self.final_norm]
        for l in range(self.n_layers(model)):
            names = (*self.attn_norms, self.mlp_in_norm) + ((self.mlp_out_norm,) if self.mlp_out_norm else ())
            paths += [f"{self.layers}.{l}.{n}" for n in names]
        return paths

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.layers)  # type: ignore[return-value]

    def n_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def softcap(self, model: nn.Module) -> float | None:
        if self.softcap_field is None:
            return None
        value = getattr(model.config, self.softcap_field, None)
        return float(value) if value else None


ADAPTERS: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for t in adapter.model_types:
        ADAPTERS[t] = adapter
    return adapter


register(ModelAdapter(
    family="gpt2", model_types=("gpt2",), layers="transformer.h", embed="transformer.wte",
    final_norm="transformer.ln_f", attn="attn", attn_norms=("ln_1",), mlp_in_norm="ln_2", norm_kind="layernorm",
    qkv=("c_attn",), attn_out="c_proj",
))
register(ModelAdapter(
    family="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), layers="model.layers",
    embed="model.embed_tokens", final_norm="model.norm", attn="self_attn", attn_norms=("input_layernorm",),
    mlp_in_norm="post_attention_layernorm",
))
register(ModelAdapter(
    family="gemma2", model_types=("gemma2",), layers="model.layers", embed="model.embed_tokens",
    final_norm="model.norm", attn="self_attn", attn_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm",
    softcap_field="final_logit_softcapping", embed_scale_sqrt_d=True, norm_kind="gemma_rmsnorm",
    attn_out_norm="post_attention_layernorm",
))
# Gemma-3's text model: Gemma-2's layout (its post_attention_layernorm normalises the attention output; the
# MLP's norms are pre_/post_feedforward_layernorm). q_norm/k_norm sit inside attention, so frozen attention
# patterns cover them; sliding-window layers differ only by their mask, which the frozen pattern carries.
register(ModelAdapter(
    family="gemma3", model_types=("gemma3_text",), layers="model.layers", embed="model.embed_tokens",
    final_norm="model.norm", attn="self_attn", attn_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm",
    softcap_field="final_logit_softcapping", embed_scale_sqrt_d=True, norm_kind="gemma_rmsnorm",
    attn_out_norm="post_attention_layernorm",
))


def adapter_for(model_or_config: Any) -> ModelAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}. "
            "Add a ModelAdapter for it in clt_hub/models/adapters.py (where its MLP input/output and norms live)"
        )
    return ADAPTERS[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)  # type: ignore[index]
    return module
