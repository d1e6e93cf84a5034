"""A model whose circuit is known: a two-layer GPT-2 built by hand, where exactly four edges matter.

Task: predict the first token of a 4-token sequence. Corrupted run: the first two tokens replaced.

    embed -> a0.h0<v>   head a0.h0 attends (by position) from everywhere to position 0 and copies its token
    a0.h0 -> a1.h0<v>   head a1.h0 attends uniformly (zero query/key weights) and copies that copy again
    a1.h0 -> m1         MLP 1 copies it once more (gelu far into its linear part)
    m1 -> logits        the unembedding reads only MLP 1's subspace

Every component writes to a subspace of its own, and reads only the subspace it is meant to. The distractors
are real: head a0.h1 copies the second token (which the corruption also changes) and head a1.h1 copies that
copy, but nothing downstream reads them; MLP 0 writes nothing; query and key inputs of uniform heads are
ignored; the positional query/key inputs of layer 0 see the same positions in both runs. Layer norms have a
huge epsilon (their scale varies by ~1e-10 between runs), so every edge but the four has an effect below
1e-8 while each of the four flips the answer.
"""

from __future__ import annotations

from typing import Any

import torch

from clt_hub.circuits.tasks import Batch

VOCAB, POSITIONS, D, HEAD = 8, 4, 64, 32
TOK, POS, S1, S2, S3, S4, S5 = 0, 8, 12, 20, 28, 36, 44  # subspace offsets (8 dims each, POS 4)
TRUTH = ("embed->a0.h0<v>", "a0.h0->a1.h0<v>", "a1.h0->m1", "m1->logits")


def _span(start: int, n: int = VOCAB) -> slice:
    return slice(start, start + n)


def known_circuit_model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The hand-built GPT-2 (transformers GPT2LMHeadModel, eager attention)."""
    import transformers as T

    cfg = T.GPT2Config(n_layer=2, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=POSITIONS, n_inner=4 * D,
                       activation_function="gelu_new", layer_norm_epsilon=1e8, tie_word_embeddings=False,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model: Any = T.GPT2LMHeadModel(cfg)
    model = model.to(dtype).eval()
    eye = torch.eye(VOCAB, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        tr.wte.weight[:, _span(TOK)] = eye
        tr.wpe.weight[:, _span(POS, POSITIONS)] = torch.eye(POSITIONS, dtype=dtype)
        for ln in [tr.ln_f] + [b.ln_1 for b in tr.h] + [b.ln_2 for b in tr.h]:
            ln.weight.fill_(1e4)  # 1 / sqrt(1e8): layer norm = centring, to 1e-10
        # Conv1D weights are [in, out]; c_attn's columns are [q | k | v], each [head 0 | head 1]
        q, k, v = 0, D, 2 * D
        a0 = tr.h[0].attn
        for h, target in ((0, 0), (1, 1)):  # a0.h<h> attends to position <target> (or itself before it)
            a0.c_attn.bias[q + h * HEAD] = 1.0
            a0.c_attn.weight[POS + target, k + h * HEAD] = 5000.0
        a0.c_attn.weight[_span(TOK), _span(v)] = eye                # head 0 values: the token
        a0.c_attn.weight[_span(TOK), _span(v + HEAD)] = eye         # head 1 values: the token
        a0.c_proj.weight[_span(0), _span(S1)] = eye                 # a0.h0 -> S1
        a0.c_proj.weight[_span(HEAD), _span(S4)] = eye              # a0.h1 -> S4 (distractor)
        a1 = tr.h[1].attn                                           # uniform attention: no q/k weights
        a1.c_attn.weight[_span(S1), _span(v)] = eye                 # a1.h0 reads S1
        a1.c_attn.weight[_span(S4), _span(v + HEAD)] = eye          # a1.h1 reads S4 (distractor)
        a1.c_proj.weight[_span(0), _span(S2)] = eye                 # a1.h0 -> S2
        a1.c_proj.weight[_span(HEAD), _span(S5)] = eye              # a1.h1 -> S5 (read by nobody)
        m1 = tr.h[1].mlp
        m1.c_fc.weight[_span(S2), _span(0)] = eye                   # hidden = S2 + 10: gelu_new is linear there
        m1.c_fc.bias[_span(0)] = 10.0
        m1.c_proj.weight[_span(0), _span(S3)] = eye
        m1.c_proj.bias[_span(S3)] = -10.0
        model.lm_head.weight[:, _span(S3)] = 10.0 * eye             # logits read S3 only
    return model


def known_circuit_batches(n: int = 32, batch_size: int = 8, seed: int = 0) -> list[Batch]:
    """Random 4-token sequences; corrupted: the first two tokens replaced by others. Answer: the first token,
    wrong: the corrupted run's first token."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, POSITIONS), generator=g)
    corrupted = clean.clone()
    for col in (0, 1):
        shift = torch.randint(1, VOCAB, (n,), generator=g)
        corrupted[:, col] = (clean[:, col] + shift) % VOCAB
    out = []
    for i in range(0, n, batch_size):
        c, x = clean[i: i + batch_size], corrupted[i: i + batch_size]
        B = c.shape[0]
        ones = torch.ones(B, 1, dtype=torch.bool)
        out.append(Batch(clean=c, corrupted=x, last=torch.full((B,), POSITIONS - 1), answers=c[:, :1],
                         answer_mask=ones, wrong=x[:, :1], wrong_mask=ones))
    return out
