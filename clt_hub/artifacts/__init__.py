"""Artifacts on disk and on the Hub: layouts, lazy rows, atomic writes, the registry, model cards.

Nothing here builds a model: readers return a config and tensors, which `clt_hub.transcoders` assembles."""
