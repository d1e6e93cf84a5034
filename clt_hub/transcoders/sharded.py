"""Decoder rows split by feature over the ranks of a process group, for CLTs whose decoders do not fit one device.

Each rank keeps a contiguous slice of every layer's features (as training's feature parallelism splits them).
Attribution needs only the rows of the features that fired, and every rank knows which those are (encoding is
replicated), so the ranks exchange exactly those rows when they are about to be read (`prefetch`: one all-reduce,
each rank filling the rows it owns) and drop them after (`release`): decoding exchanges one source layer's active
rows at a time, and attribution one chunk of features per backward pass unless its memory plan holds them all.
Decoding a sharded transcoder is therefore a collective: every rank decodes the same activations. A row read
without being exchanged is refused: it would be a collective that some ranks never call.
"""

from __future__ import annotations

import torch

from clt_hub.distributed import all_reduce, rank_world
from clt_hub.errors import ConfigError
from clt_hub.transcoders.state import canonical_tensors
from clt_hub.transcoders.transcoder import Transcoder

__all__ = ["ShardedRows", "shard_decoders"]


class ShardedRows:
    """One layer's decoder rows [F, n_targets, d]: rows lo..hi held here, exchanged rows cached."""

    def __init__(self, local: torch.Tensor, lo: int, n_rows: int):
        self.local, self.lo, self.hi = local, lo, lo + len(local)
        self.shape = (n_rows, *local.shape[1:])
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def prefetch(self, index: torch.Tensor) -> torch.Tensor:
        """Collective: every rank calls it with the same `index`; afterwards `rows(index)` is local everywhere,
        until `release`. Returns the rows newly held (neither local nor held before)."""
        index = torch.as_tensor(index, dtype=torch.long).unique()
        rows = torch.zeros(len(index), *self.shape[1:], dtype=self.local.dtype, device=self.local.device)
        mine = (index >= self.lo) & (index < self.hi)
        rows[mine] = self.local[index[mine] - self.lo]
        all_reduce(rows)  # each row is non-zero on its owner only: the sum is the row
        new = [i for i in index[~mine].tolist() if i not in self._cache]
        self._cache.update((i, r) for i, r, m in zip(index.tolist(), rows.unbind(0), mine.tolist(), strict=True)
                           if not m)
        return torch.tensor(new, dtype=torch.long)

    def release(self, index: torch.Tensor) -> None:
        """Drop exchanged rows (local: no collective); rows this rank owns stay."""
        for i in torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist():
            self._cache.pop(i, None)

    def rows(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        wanted = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        missing = [i for i in wanted if i not in self._cache and not self.lo <= i < self.hi]
        if missing:
            raise ConfigError(f"decoder rows {missing[:8]} live on other ranks and were not exchanged; sharded "
                              "decoders serve the features attribution found active (prefetch them first)")
        if not wanted:
            return self.local[:0]
        return torch.stack([self._cache[i] if i in self._cache else self.local[i - self.lo] for i in wanted])

    def all(self) -> torch.Tensor:
        raise ConfigError("this transcoder's decoders are sharded over the ranks; each rank holds "
                          f"{self.hi - self.lo} of {self.shape[0]} rows. Load it without sharding to save or "
                          "evaluate it")


def shard_decoders(tc: Transcoder) -> Transcoder:
    """The same transcoder with each rank keeping only its slice of every decoder (rows lo..hi of F, split as
    evenly as the world size allows); encoders, biases and skips stay whole. One process: `tc` unchanged."""
    rank, world = rank_world()
    if world == 1:
        return tc
    F = tc.d_sae
    lo, hi = rank * F // world, (rank + 1) * F // world
    index = torch.arange(lo, hi)
    readers = {l: ShardedRows(tc.decoder_rows(l, index).detach().clone(), lo, F) for l in range(tc.n_layers)}
    return type(tc).from_tensors(tc.cfg, canonical_tensors(tc, decoders=False), lazy_decoders=readers,
                                 device=tc.device, dtype=tc.dtype)
