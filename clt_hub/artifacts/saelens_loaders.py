"""SAE-Lens loaders for clt_hub CLT layers (SAE-Lens itself has no cross-layer transcoder).

One CLT layer loads as a SAE-Lens `jumprelu_transcoder` (or `transcoder`, or the skip variants):
the encoder is exact; the decoder is the layer's own l -> l block plus b_dec[l], i.e. the part of
layer l's MLP-output reconstruction that layer-l features write. Contributions from earlier
layers' features are not representable in a single SAE-Lens transcoder. PLTs need none of this:
their native layout is SAE-Lens's own.

    SAE.from_pretrained("org/repo", "layer_3", converter=clt_layer_loader)
    SAE.load_from_disk("path/to/artifact/layer_3", converter=clt_layer_disk_loader)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clt_hub.artifacts.layouts.common import read_json, read_safetensors, saelens_architecture, take
from clt_hub.config import torch_dtype
from clt_hub.errors import ArtifactError


def _layer_from_folder(folder_name: str) -> int:
    try:
        return int(folder_name.rstrip("/").rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise ArtifactError(f"SAE id {folder_name!r} is not of the form 'layer_<n>'") from None


def _assemble(cfg: dict[str, Any], enc_path: Path, dec_path: Path, skip_path: Path | None, layer: int,
              device: str, cfg_overrides: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = dict(cfg)
    cfg["device"] = device
    if cfg_overrides:
        cfg.update(cfg_overrides)
    enc = read_safetensors(enc_path)
    dec = read_safetensors(dec_path)
    state = {
        "W_enc": take(enc, f"W_enc_{layer}", enc_path).T.contiguous(),
        "b_enc": take(enc, f"b_enc_{layer}", enc_path),
        "b_dec": take(enc, f"b_dec_{layer}", enc_path),
        "W_dec": take(dec, f"W_dec_{layer}", dec_path)[:, 0, :].contiguous(),
    }
    if f"threshold_{layer}" in enc:
        state["threshold"] = enc.pop(f"threshold_{layer}")
    if skip_path is not None:
        state["W_skip"] = take(read_safetensors(skip_path), f"W_skip_{layer}", skip_path)
    arch = cfg.get("architecture")
    expected = {"jumprelu_transcoder", "jumprelu_skip_transcoder", "transcoder", "skip_transcoder"}
    if arch not in expected:
        raise ArtifactError(f"{enc_path.parent}: layer cfg architecture {arch!r} cannot be loaded by SAE-Lens")
    dtype = torch_dtype(cfg.get("dtype", "float32"))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    return cfg, state


def clt_layer_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """SAE-Lens `PretrainedSaeHuggingfaceLoader` for one layer of a clt_hub CLT on the Hub."""
    from huggingface_hub import hf_hub_download

    layer = _layer_from_folder(folder_name)

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, force_download=force_download))

    cfg = read_json(get(f"{folder_name}/cfg.json"))
    skip = get(f"W_skip_{layer}.safetensors") if "skip" in str(cfg.get("architecture", "")) else None
    cfg, state = _assemble(cfg, get(f"W_enc_{layer}.safetensors"), get(f"W_dec_{layer}.safetensors"),
                           skip, layer, device, cfg_overrides)
    return cfg, state, None


def clt_layer_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAE-Lens `PretrainedSaeDiskLoader` for `<artifact>/layer_<n>` of a clt_hub CLT on disk."""
    folder = Path(path)
    layer = _layer_from_folder(folder.name)
    root = folder.parent
    cfg = read_json(folder / "cfg.json")
    skip = root / f"W_skip_{layer}.safetensors" if "skip" in str(cfg.get("architecture", "")) else None
    return _assemble(cfg, root / f"W_enc_{layer}.safetensors", root / f"W_dec_{layer}.safetensors",
                     skip, layer, device, cfg_overrides)


__all__ = ["clt_layer_disk_loader", "clt_layer_loader", "saelens_architecture"]
