"""Issue 36 item 4: the held-out evaluation runs chunks of one length in batches. The batch size changes which
chunks share a forward pass, never which chunks are evaluated, so every metric agrees with one chunk at a time
(and with the pre-batching algorithm: separate forward passes, every MLP run) up to float rounding."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import random_transcoder, sum_rounding_bound, word_lines
from test_trace_cli import word_tokenizer
from tiny_models import tiny_model

from clt_hub.errors import ConfigError
from clt_hub.models.adapters import adapter_for, get_module
from clt_hub.models.hooks import mlp_io, mlp_points, replace_outputs, transcoder_in_place
from clt_hub.training.activation_store import token_chunks
from clt_hub.training.evaluate import EvalReport, evaluate

pytestmark = [pytest.mark.numeric, pytest.mark.usefixtures("one_thread")]  # numeric: tests/TOLERANCES.md

CONTEXT = 16  # word_lines are 6..30 tokens with <bos>: chunks of 16 and last pieces of 2..15 tokens
SENSITIVITY = 100  # assumed, see _tolerances


@pytest.fixture(scope="module", params=["gpt2", "gemma3"])  # gemma3: the MLP output point is the norm after it
def setup(request: pytest.FixtureRequest) -> tuple[Any, Any, Any, list[str]]:
    """A tiny model and transcoder in float64 (so rounding is ~1e-16 and the tolerances below have room to
    spare), the word tokenizer and texts whose chunks have many lengths, several chunks of most."""
    model = tiny_model(request.param, n_layers=3, d_model=32).double()
    tc = random_transcoder("clt", n_layers=3, d_model=32, d_sae=16, seed=2, dtype="float64")
    return model, word_tokenizer(), tc, word_lines(40)


@torch.no_grad()
def _one_chunk_at_a_time(model: Any, tok: Any, tc: Any, texts: list[str], n_tokens: int) -> EvalReport:
    """The evaluation as it was before batching (kept here as the definition of the metrics): per chunk, MLP
    inputs/outputs from the trunk, then three full forward passes (plain, every MLP replaced by the transcoder,
    every MLP zeroed) with every MLP run, and log-softmax of whole logits tensors. In the model's dtype."""
    special = torch.tensor(sorted(tok.all_special_ids))
    L = tc.n_layers
    err, sq, l0 = (torch.zeros(L, dtype=torch.float64) for _ in range(3))
    s1 = torch.zeros(L, tc.d_model, dtype=torch.float64)
    fired = torch.zeros(L, tc.d_sae, dtype=torch.float64)
    n = agree = n_pos = n_pred = 0
    kl = ce_o = ce_r = ce_z = 0.0
    outs = mlp_points(model, tc.cfg)[1]
    for chunk in token_chunks(texts, tok, CONTEXT):
        ids = torch.tensor([chunk])
        x, y = mlp_io(model, ids, tc.cfg.feature_input_hook, tc.cfg.feature_output_hook)
        keep = ~torch.isin(ids[0], special)
        x, y = x[0][keep], y[0][keep]
        recon, a = tc(x)
        err += (recon - y).pow(2).sum((0, 2))
        sq += y.pow(2).sum((0, 2))
        s1 += y.sum(0)
        fired += (a > 0).double().sum(0)
        l0 += (a > 0).double().sum((0, 2))
        n += int(keep.sum())
        logits = model(ids).logits[0]
        with transcoder_in_place(model, tc):
            replaced = model(ids).logits[0]
        with replace_outputs(model, outs, lambda l, o: torch.zeros_like(o)):
            zeroed = model(ids).logits[0]
        lp, lq = logits.log_softmax(-1), replaced.log_softmax(-1)
        kl += float((lp.exp() * (lp - lq)).sum())
        agree += int((logits.argmax(-1) == replaced.argmax(-1)).sum())
        target = ids[0, 1:]
        ce = torch.nn.functional.cross_entropy
        ce_o += float(ce(logits[:-1], target, reduction="sum"))
        ce_r += float(ce(replaced[:-1], target, reduction="sum"))
        ce_z += float(ce(zeroed[:-1], target, reduction="sum"))
        n_pred += len(target)
        n_pos += len(chunk)
        if n >= n_tokens:
            break
    var = sq - s1.pow(2).sum(-1) / n
    return EvalReport(n_tokens=n, nmse=(err / sq).tolist(), fvu=(err / var).tolist(), l0=(l0 / n).tolist(),
                      dead_fraction=(fired == 0).double().mean(-1).tolist(),
                      dense_fraction=(fired / n > 0.1).double().mean(-1).tolist(), next_token_agreement=agree / n_pos,
                      kl=kl / n_pos, ce_original=ce_o / n_pred, ce_replaced=ce_r / n_pred, ce_zero_ablated=ce_z / n_pred)


def _tolerances(r: EvalReport, vocab: int, widest: int) -> dict[str, Any]:
    """How far two float64 evaluations of the same chunks, batched differently, may be apart, per field.

    Both run the same operations on the same values; only the grouping differs (matmuls over [4 x T, d] or
    [T, d], sums over tokens in other orders). Every metric is a ratio of sums over the evaluated tokens of at
    most `widest` terms per token, so n = n_tokens x widest terms, and two orders of a sum of non-negative
    terms are within 2 gamma_n of its value (helpers.sum_rounding_bound; tests/TOLERANCES.md). The terms
    themselves come out of forward passes that round too; SENSITIVITY (100, an assumption, not a bound) is how
    much the model may amplify a relative rounding of its sums. eps = SENSITIVITY x 2 gamma_n, about 1e-9 here;
    the differences measured are about 1e-16 relative (1e-14 for ce_recovered, whose denominator cancels).

    - ce_*: sums of -log p >= 0: eps x value. nmse = err / sq: 2 eps relative.
    - fvu = err / var, var = sq - |sum y|^2 / n cancels: var's error is eps x (sq + |sum y|^2 / n) <= 2 eps sq,
      and sq / var = fvu / nmse, so (1 + 2 fvu / nmse) eps relative.
    - kl: per token sum_v p (log p - log q), signed terms of total magnitude sum_v p |log p| + p |log q| =
      H(p) + H(p, q) = 2 H(p) + KL <= 2 log(vocab) + KL: eps x (2 log vocab + kl).
    - ce_recovered = (ce_z - ce_r) / (ce_z - ce_o): d(a / b) <= (da + |a / b| db) / |b| from the above.
    - counts (n_tokens, l0, dead/dense fractions, agreement) compare a value with 0, a threshold or another
      logit: equal unless a margin is within ~1e-13, which random weights do not give: exact."""
    eps = float(SENSITIVITY * sum_rounding_bound(r.n_tokens * widest, 1.0, dtype=torch.float64))
    tol: dict[str, Any] = {
        "nmse": [2 * eps * abs(v) for v in r.nmse],
        "fvu": [(1 + 2 * f / max(m, 1e-300)) * eps * abs(f) for f, m in zip(r.fvu, r.nmse, strict=True)],
        "kl": eps * (2 * math.log(vocab) + abs(r.kl)),
        **{k: eps * abs(getattr(r, k)) for k in ("ce_original", "ce_replaced", "ce_zero_ablated")}}
    a, b = r.ce_zero_ablated - r.ce_replaced, r.ce_zero_ablated - r.ce_original
    da, db = tol["ce_zero_ablated"] + tol["ce_replaced"], tol["ce_zero_ablated"] + tol["ce_original"]
    tol["ce_recovered"] = (da + abs(a / b) * db) / abs(b)
    return tol


def _assert_agree(got: EvalReport, want: EvalReport, vocab: int, widest: int) -> None:
    tol = _tolerances(want, vocab, widest)
    g, w = got.to_dict(), want.to_dict()
    assert g.keys() == w.keys()
    for key in w:
        if key not in tol:
            assert g[key] == w[key], key
            continue
        gv, wv, tv = (torch.tensor(v, dtype=torch.float64) for v in (g[key], w[key], tol[key]))
        assert ((gv - wv).abs() <= tv).all(), (key, g[key], w[key], tol[key])


def _widest(model: Any, tc: Any) -> int:
    """The most terms one token's sum can have: the vocabulary (log-softmax), the MLP width, all features."""
    return max(model.config.vocab_size, 4 * tc.d_model, tc.n_layers * tc.d_sae)


def test_batched_metrics_match_one_chunk_at_a_time(setup: tuple) -> None:
    model, tok, tc, texts = setup
    lengths = [len(c) for c in token_chunks(texts, tok, CONTEXT)]
    assert lengths.count(CONTEXT) > 8 and len(set(lengths)) > 5  # full batches, partial ones, many lengths
    vocab, widest = model.config.vocab_size, _widest(model, tc)
    one = evaluate(model, tok, tc, texts, n_tokens=10**6, context_size=CONTEXT, batch_size=1)
    assert one.kl > 0 and one.ce_zero_ablated != one.ce_original and 0 < one.next_token_agreement < 1
    for batch_size in (4, 7):
        _assert_agree(evaluate(model, tok, tc, texts, n_tokens=10**6, context_size=CONTEXT, batch_size=batch_size),
                      one, vocab, widest)
    # the batched path (one forward for MLP activations and logits, MLPs not run where overwritten) computes the
    # metrics the pre-batching algorithm did, here stopped part-way through the texts
    _assert_agree(evaluate(model, tok, tc, texts, n_tokens=300, context_size=CONTEXT, batch_size=4),
                  _one_chunk_at_a_time(model, tok, tc, texts, 300), vocab, widest)


def _chunks_until(texts: list[str], tok: Any, n_tokens: int) -> list[list[int]]:
    """The chunks evaluated: read in order until their non-special tokens reach n_tokens."""
    special, chosen, n = set(tok.all_special_ids), [], 0
    for chunk in token_chunks(texts, tok, CONTEXT):
        chosen.append(chunk)
        n += sum(t not in special for t in chunk)
        if n >= n_tokens:
            break
    return chosen


@pytest.fixture
def forwards(setup: tuple) -> Iterator[list[tuple[int, int]]]:
    """The [batch, length] shape of every forward pass through the model while the test runs."""
    model = setup[0]
    shapes: list[tuple[int, int]] = []
    embed = get_module(model, adapter_for(model).embed)
    handle = embed.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    yield shapes
    handle.remove()


@pytest.mark.parametrize("n_tokens", [1, 45, 200, 10**6])
def test_batched_path_evaluates_the_same_tokens(setup: tuple, forwards: list[tuple[int, int]], n_tokens: int) -> None:
    model, tok, tc, texts = setup
    chunks = _chunks_until(texts, tok, n_tokens)
    special = set(tok.all_special_ids)
    want = sum(t not in special for c in chunks for t in c)
    for batch_size in (1, 3, 8):
        forwards.clear()
        report = evaluate(model, tok, tc, texts, n_tokens=n_tokens, context_size=CONTEXT, batch_size=batch_size)
        assert report.n_tokens == want
        # three passes per batch (model with MLP activations, replacement, zero-ablated) over exactly those chunks
        assert sum(b * t for b, t in forwards) == 3 * sum(len(c) for c in chunks)
        assert max(b for b, _ in forwards) == min(batch_size, max(sum(len(c) == n for c in chunks)
                                                                    for n in {len(c) for c in chunks}))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8", None])
def test_batch_size_must_be_a_positive_whole_number(setup: tuple, bad: object) -> None:
    model, tok, tc, texts = setup
    with pytest.raises(ConfigError, match=r"batch_size must be a whole number of chunks .* at least 1; got .*"
                                          r"batch_size=8"):
        evaluate(model, tok, tc, texts, n_tokens=10, context_size=CONTEXT, batch_size=bad)  # type: ignore[arg-type]
