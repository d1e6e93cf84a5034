"""TopK and BatchTopK training as active entries: which (token, feature) entries a step keeps, and AuxK's loss
on the dead ones. Both decode from the chosen entries alone (clt_hub.transcoders.sparse), so a step's cost
follows k, not the dictionary's width."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clt_hub.transcoders.sparse import ActiveIndex, active_preacts
from clt_hub.transcoders.transcoder import Transcoder


def encode_active(tc: Transcoder, x: torch.Tensor, k: int, batch_topk: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[ActiveIndex]]:
    """TopK/BatchTopK of `tc` (this rank's features) on x [B, L, d]: the pre-activations [B, L, F] (computed
    without autograd: the choice needs all of them), the activations [B, L, F] (no autograd, for the
    statistics), and per layer the chosen entries' values (with autograd through `active_preacts`) and their
    index. BatchTopK ranks all B*F entries of a layer at once."""
    n_layers = tc.n_layers
    B, F = x.shape[0], tc.d_sae
    with torch.no_grad():
        pres = [tc.pre_activations(x[:, l], l) for l in range(n_layers)]
        pre = torch.stack(pres, dim=1)
    chosen: list[tuple[torch.Tensor, ActiveIndex]] = []
    if batch_topk:
        with torch.no_grad():
            flat = torch.relu(pre).permute(1, 0, 2).reshape(n_layers, -1)
            top = flat.topk(k * B, dim=-1).indices
        for l in range(n_layers):
            idx, entries = ActiveIndex.from_flat(top[l], B, F)
            chosen.append((pres[l].reshape(-1)[entries], idx))
    else:
        for l in range(n_layers):
            vals, top = pres[l].topk(k, dim=-1)          # as topk_relu does
            chosen.append((vals.reshape(-1), ActiveIndex.from_topk(top, F)))
    values = [torch.relu(active_preacts(c, x[:, l], tc.W_enc[l], tc.b_enc[l], idx))
              for l, (c, idx) in enumerate(chosen)]
    index = [idx for _, idx in chosen]
    with torch.no_grad():
        acts = torch.zeros_like(pre)
        for l, (v, idx) in enumerate(zip(values, index, strict=True)):
            acts[:, l].index_put_((idx.pos, idx.feat), v.detach().to(acts.dtype))
    return pre, acts, values, index


def auxk_loss(tc: Transcoder, x: torch.Tensor, y: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor,
              dead: torch.Tensor, k_aux: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): the top `k_aux` dead features
    (`dead` [L, F]) of each token and layer, by pre-activation, reconstruct the main reconstruction's error
    e = y - recon (e taken as fixed: only the dead features learn from it), through their decoders alone (no
    bias, no skip; a CLT feature writes to every later layer as usual). Returns sum over layers of
    ||e - e_hat||^2, mean over tokens: the mse's units. Decoded from the active entries, so its cost follows
    k_aux."""
    if not bool(dead.any()):
        return torch.zeros((), device=recon.device)
    B, F = x.shape[0], tc.d_sae
    k = min(k_aux, F)
    values: list[torch.Tensor] = []
    index: list[ActiveIndex] = []
    for l in range(tc.n_layers):
        with torch.no_grad():
            masked = pre[:, l].detach().masked_fill(~dead[l], float("-inf"))
            vals, top = masked.topk(k, dim=-1)
            keep = (vals > 0).reshape(-1)                  # dead and positive (ReLU of the rest is 0)
            pos = torch.arange(B, device=x.device).repeat_interleave(k)[keep]
        idx = ActiveIndex.from_entries(pos, top.reshape(-1)[keep], B, F)
        values.append(torch.relu(active_preacts(vals.reshape(-1)[keep], x[:, l], tc.W_enc[l], tc.b_enc[l], idx)))
        index.append(idx)
    e_hat = tc.decode_active(values, index, biases=False, reduce=reduce)
    e = (y - recon.to(y.dtype)).detach()
    return (e_hat.to(y.dtype) - e).pow(2).sum(-1).sum(-1).mean()
