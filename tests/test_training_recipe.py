"""What the real-model recipe adds to training: a skip path started at its least-squares fit, epochs over a
smaller activation cache, and the general-English corpus built from Debian's text packages."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from test_training import corpus  # noqa: F401 - the tiny model and word corpus, a module fixture

from clt_hub import Transcoder
from clt_hub.config import Architecture
from clt_hub.errors import ConfigError
from clt_hub.training import english
from clt_hub.training.config import TrainConfig
from clt_hub.training.run import train
from clt_hub.training.trainer import Trainer

pytestmark = pytest.mark.numeric  # compares floats across code paths: tests/TOLERANCES.md


def _affine_batches(n_layers: int, d: int, n_batches: int, batch: int, noise: float
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n_layers, d, d, generator=g)
    b = torch.randn(n_layers, d, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, n_layers, d, generator=g) * 4 + 1
        y = torch.einsum("nli,loi->nlo", x, A) + b + noise * torch.randn(batch, n_layers, d, generator=g)
        out.append((x, y))
    return out, A, b


def test_skip_fit_is_the_least_squares_solution() -> None:
    L, d = 3, 8
    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16, skip=True), n_tokens=256,
                      batch_size=64, skip_init_tokens=192)
    tr = Trainer(cfg, n_layers=L, d_model=d)
    batches, _, _ = _affine_batches(L, d, 3, 64, noise=0.5)
    tr.fit_scales(*batches[0])
    tr.fit_skip(batches)
    x = torch.cat([b[0] for b in batches]).double() * tr.scale_in.double()[None, :, None]
    y = torch.cat([b[1] for b in batches]).double() * tr.scale_out.double()[None, :, None]
    for l in range(L):
        xa = torch.cat([x[:, l], torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        # the same ridge objective by QR on the stacked design [xa; sqrt(ridge) I] (the fit uses normal equations)
        ridge = 1e-8 * xa.pow(2).sum(0).mean()
        design = torch.cat([xa, ridge.sqrt() * torch.eye(d + 1, dtype=torch.float64)])
        target = torch.cat([y[:, l], torch.zeros(d + 1, d, dtype=torch.float64)])
        ref = torch.linalg.lstsq(design, target).solution                    # [d+1, d]
        # float64 solves agree to ~cond^2 * 1e-16 (cond of this design < 1e2); what remains is the float32 cast
        # of the stored weights: half an ulp, 6e-8 relative to each value's own size
        assert torch.allclose(tr.tc.W_skip[l].double(), ref[:d].T, rtol=1.2e-7, atol=1e-9)
        assert torch.allclose(tr.tc.b_dec[l].double(), ref[d], rtol=1.2e-7, atol=1e-9)


def test_skip_fit_recovers_an_exact_affine_map_in_raw_units() -> None:
    """With no noise the fit is the map itself; exported (scales folded back) it is the map in raw units."""
    L, d = 2, 6
    cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=8, skip=True), n_tokens=128,
                      batch_size=64, skip_init_tokens=128)
    tr = Trainer(cfg, n_layers=L, d_model=d)
    batches, A, b = _affine_batches(L, d, 2, 64, noise=0.0)
    tr.fit_scales(*batches[0])
    tr.fit_skip(batches)
    tc = tr.export()
    for l in range(L):
        # the normal equations square the condition number (~1e2 here): 1e-12 in float64, then a float32 cast
        assert torch.allclose(tc.W_skip[l], A[l], rtol=1e-5, atol=1e-5)


def _run(root: Path, out: Path, **overrides: object) -> Path:
    cfg = TrainConfig(model=str(root / "model"), dataset=str(root / "train.txt"), out_dir=str(out),
                      transcoder=Architecture(d_sae=32, skip=True, activation="topk", topk=4), n_tokens=1024,
                      batch_size=256, lr=1e-3, context_size=32, warmup_steps=2, log_every=1, checkpoint_every=2,
                      **overrides)  # type: ignore[arg-type]
    cfg.validate()
    return train(cfg, resume=True, progress=False)


def _first_fvu(out: Path) -> float:
    return json.loads((out / "train_log.jsonl").read_text().splitlines()[0])["fvu"]


def test_a_run_starts_at_the_fit_and_resumes_to_the_same_weights(corpus: Path, tmp_path: Path  # noqa: F811
                                                                 ) -> None:
    fitted = _run(corpus, tmp_path / "fit", skip_init_tokens=512)
    _run(corpus, tmp_path / "zero")
    # step 1 is trained on the fit's own first batch: starting from the fit, its error is below a zero skip's
    assert _first_fvu(tmp_path / "fit") < 0.9 * _first_fvu(tmp_path / "zero")
    # interrupted after step 2 (its checkpoint kept, step 4's gone): the resumed run replays the batches the
    # fit used and takes the fit from the checkpoint, so it ends with the same weights, bit for bit
    for sub in ("checkpoints/step_00000004", "transcoder"):
        import shutil

        shutil.rmtree(tmp_path / "fit" / sub)
    again = _run(corpus, tmp_path / "fit", skip_init_tokens=512)
    a, b = Transcoder.from_pretrained(fitted).tensors(), Transcoder.from_pretrained(again).tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_tokens_trains_epochs_over_a_smaller_cache(corpus: Path, tmp_path: Path) -> None:  # noqa: F811
    out = _run(corpus, tmp_path / "run", cache_dir=str(tmp_path / "cache"), cache_tokens=512)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["n_tokens"] == 512  # the cache, not n_tokens (1,024): two epochs over it
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and out.is_dir()


@pytest.mark.parametrize(("fields", "message"), [
    ({"skip_init_tokens": 100}, "needs a skip transcoder"),
    ({"skip_init_tokens": -1}, "must be an integer >= 0"),
    ({"cache_tokens": 512}, "needs cache_dir"),
    ({"cache_tokens": 10, "cache_dir": "c"}, "at least one batch"),
    ({"skip_lr_scale": 0.5}, "skip_lr_scale needs a skip transcoder"),
    ({"skip_lr_scale": -1.0}, "must be a number >= 0"),
])
def test_recipe_fields_are_checked(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=8), n_tokens=512, batch_size=64,
                    **fields).validate()


def _fake_debian(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three packages' files in their own formats, small."""
    wn = root / "wordnet"
    wn.mkdir()
    header = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    (wn / "data.noun").write_text(header + "".join(
        f"0914{i:04d} 15 n 02 Dallas_{i} 0 big_D(a) 0 002 @i 08524735 n 0000 | a large city in northeastern Texas  \n"
        for i in range(40)), encoding="latin-1")
    for pos in ("verb", "adj", "adv"):
        (wn / f"data.{pos}").write_text(header)
    fortunes = root / "fortunes"
    fortunes.mkdir()
    (fortunes / "songs-poems").write_text("".join(f"A bit of talcum number {i}\nIs always walcum\n%\n"
                                                  for i in range(30)))
    (fortunes / "songs-poems.dat").write_bytes(b"\0")
    (fortunes / "ascii-art").write_text("(\\_/)\n(o.o) a picture drawn in characters\n%\n")
    (fortunes / "ascii-art.dat").write_bytes(b"\0")
    state = root / "state"
    state.mkdir()
    (state / "us-declaration.gz").write_bytes(gzip.compress(
        b"We hold these truths to be self-evident, that all men are created equal, that they are endowed.\n\n"
        b"short\n"))
    monkeypatch.setattr(english, "WORDNET", wn)
    monkeypatch.setattr(english, "FORTUNES", fortunes)
    monkeypatch.setattr(english, "US_DOCUMENTS", state)


def test_english_corpus_reads_each_package_and_mixes_the_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    _fake_debian(tmp_path, monkeypatch)
    monkeypatch.setattr(english.python_docs, "documents", lambda: iter(
        [(f"doc:{i}", f"Return the number of items in a container, document {i}. " * 12) for i in range(50)]))
    info = english.build(tmp_path / "out")
    assert set(info["sources"]) == {"wordnet", "fortunes", "python_docs", "us_documents"}
    train = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "out" / "heldout.jsonl").read_text().splitlines()]
    names = [r["name"] for r in train + held]
    assert len(names) == len(set(names)) == sum(s["documents"] for s in info["sources"].values())
    text = "\n".join(r["text"] for r in train + held)
    # WordNet: the words (underscores as spaces, no syntactic markers, no licence header) then the gloss
    assert "Dallas 7, big D: a large city in northeastern Texas" in text and "LICENSEE" not in text
    assert "Is always walcum" in text and "picture drawn" not in text  # ascii-art left out
    assert "self-evident" in text and "short" not in text.split()
    # round robin: the first four documents come from four different sources
    assert len({r["name"].split(":")[0] for r in train[:3]}) == 3
    # documents are grouped to about DOC_CHARS characters, not one line each
    wordnet_docs = [r for r in train + held if r["name"].startswith("wordnet")]
    assert len(wordnet_docs) < 40 and all(len(r["text"]) < 2 * english.DOC_CHARS for r in wordnet_docs)


def test_english_corpus_names_the_missing_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(english, "WORDNET", tmp_path / "none")
    monkeypatch.setattr(english, "FORTUNES", tmp_path / "none")
    with pytest.raises(ConfigError, match=r"apt-get install -y wordnet-base fortunes"):
        english.build(tmp_path / "out")


def test_cache_shards_are_sized_to_fit_memory(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
                                              ) -> None:
    """A shard read back as float32 x and y stays under SHARD_BYTES (the tiny model: 3 layers x 32 dims)."""
    from clt_hub.models.loading import load_model
    from clt_hub.texts import iter_texts
    from clt_hub.training import activation_store

    monkeypatch.setattr(activation_store, "SHARD_BYTES", 100 * 8 * 3 * 32)   # room for 100 tokens
    model, tok = load_model(str(corpus / "model"))
    cache = activation_store.ActivationCache.build(model, tok, iter_texts(corpus / "heldout.txt"), tmp_path / "c",
                                                   n_tokens=450, cfg=activation_store.SourceConfig(context_size=32))
    sizes = [s["n_tokens"] for s in cache.shards]
    assert sum(sizes) == 450 and len(sizes) >= 4 and max(sizes) < 100 + 32 * 8  # a flush follows one model batch


def test_skip_lr_scale_scales_the_skip_paths_steps_and_zero_keeps_it_fixed() -> None:
    L, d = 2, 8
    batches, _, _ = _affine_batches(L, d, 2, 64, noise=0.5)

    def first_step(scale: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        cfg = TrainConfig(model="m", dataset="d", transcoder=Architecture(d_sae=16, skip=True), n_tokens=1280,
                          batch_size=64, skip_init_tokens=128, skip_lr_scale=scale, warmup_steps=1)
        tr = Trainer(cfg, n_layers=L, d_model=d)
        tr.fit_scales(*batches[0])
        tr.fit_skip(batches)
        skip0, enc0 = tr.tc.W_skip[0].detach().clone(), tr.tc.W_enc[0].detach().clone()
        tr.train_step(*batches[0])
        return tr.tc.W_skip[0].detach() - skip0, tr.tc.W_enc[0].detach() - enc0, float(skip0.abs().max())

    full_skip, full_enc, size = first_step(1.0)
    half_skip, half_enc, _ = first_step(0.5)
    frozen_skip, frozen_enc, _ = first_step(0.0)
    assert torch.equal(frozen_skip, torch.zeros_like(frozen_skip))        # lr 0: AdamW leaves it exactly
    assert full_skip.abs().max() > 0
    # Adam's first step is lr * g / (|g| + eps): halving lr halves it. Each step is read back as a difference
    # of float32 weights: two roundings of a weight (half an ulp each, ulp = eps * its size) on either side
    ulp = torch.finfo(torch.float32).eps * size
    assert torch.allclose(half_skip, full_skip / 2, rtol=0, atol=2 * ulp)
    # the other parameters take the same step whatever the skip path's scale (same gradients, same lr)
    assert torch.equal(full_enc, half_enc) and torch.equal(full_enc, frozen_enc)
