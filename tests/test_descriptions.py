from __future__ import annotations

import torch
from helpers import random_transcoder
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model

from clt_hub.descriptions import clerps, top_tokens


def test_feature_writing_a_token_direction_is_labelled_with_that_token() -> None:
    model = tiny_model("llama", n_layers=3, d_model=32)
    tc = random_transcoder("clt", n_layers=3, d_model=32, d_sae=8)
    W_U = model.lm_head.weight.detach()
    gain = model.model.norm.weight.detach()
    with torch.no_grad():
        tc.W_dec[1][5] = 0
        tc.W_dec[1][5, 1] = 10 * (W_U[17] - W_U.mean(0)) / gain  # writes token 17's direction at layer 2
    tok = word_tokenizer()
    assert top_tokens(model, tok, tc, 1, [5], k=1) == [[tok.decode([17])]]
    labels = clerps(model, tok, tc, torch.tensor([[1, 3, 5]]))
    assert labels["1_5_3"].startswith("→ 'w13'")  # token 17 is "w13" in the word vocabulary
