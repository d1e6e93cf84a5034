from __future__ import annotations

import pytest
import torch
from helpers import random_transcoder
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model

from clt_hub.attribution.descriptions import clerps, top_contexts, top_tokens
from clt_hub.models.hooks import mlp_io


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


def test_top_contexts_are_the_true_maxima() -> None:
    tok = word_tokenizer()
    model = tiny_model("gpt2", n_layers=3, d_model=32)
    tc = random_transcoder("clt", n_layers=3, d_model=32, d_sae=24, seed=1)
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (int(n),), generator=g))
             for n in torch.randint(3, 12, (20,), generator=g)]
    wanted = [(0, 1), (1, 5), (2, 7), (2, 8)]
    found = top_contexts(model, tok, tc, texts, wanted, k=3, window=4)
    for l, f in wanted:
        acts = []  # brute force: this feature's activation at every non-BOS token of every text
        for text in texts:
            ids = tok(text)["input_ids"]
            x, _ = mlp_io(model, torch.tensor([ids]))
            a = tc.encode_layer(x[0, 1:, l], l)[:, f].detach()
            acts.append((float(a.max()), tok.convert_ids_to_tokens([ids[1 + int(a.argmax())]])[0]))
        expected = sorted((a for a, _ in acts if a > 0), reverse=True)[:3]
        got = found[(l, f)]
        assert [c.activation for c in got] == pytest.approx(expected, rel=1e-6)
        if got:
            best_token = max(acts)[1]
            assert got[0].token.strip() == best_token and got[0].text.endswith(got[0].token)
