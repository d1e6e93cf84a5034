"""paper_cases: the real-model code path runs end to end on tiny random models of every family
(no mechanism expected there), and the checks pass on the bundled organism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import random_transcoder
from tiny_models import FAMILIES, tiny_model

from paper_cases import addition, greater_than, rhyme, two_hop
from paper_cases.__main__ import CHECK_FAILED, main
from paper_cases.common import Subject


def real_prompt_tokenizer():
    """Word-level tokenizer covering the paper's prompts: digits, punctuation and line breaks are tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),  # a line break is a token
                                   pre_tokenizers.Split(" ", behavior="removed"),
                                   pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    texts = [p for row in two_hop.REAL_PROMPTS for p in (row[0], row[1], row[3], row[4])]
    texts += [p for pair in rhyme.REAL_LINES for p in pair] + ["calc: 0123456789+="]
    # the real-model checks' own prompts: one-hop recall, years, couplets
    texts += [two_hop.one_hop_prompt(c) + " " + s for s, cities in two_hop.CITIES.items() for c in cities]
    texts += [greater_than.prompt(32)] + [rhyme.couplet(*c) for c in rhyme.REAL_COUPLETS]
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)}
    vocab = ["<bos>", "<eos>", "<pad>", "<unk>"] + sorted(words)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>"), len(vocab)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_model_path_runs_on_tiny_models(family: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok, vocab = real_prompt_tokenizer()
    model = tiny_model(family, n_layers=2, d_model=32, vocab=vocab)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    tc = random_transcoder("clt", n_layers=2, d_model=32, d_sae=24, seed=1, model_name=f"tiny-{family}")
    with torch.no_grad():
        for t in tc.threshold:
            t.fill_(0.5)
    tc.save_pretrained(tmp_path / "clt")
    if family == "gpt2":  # the command line, loading from folders: every real-model check, then the paper's prompts
        code = main(["--model", str(tmp_path / "model"), "--transcoder", str(tmp_path / "clt"), "-n", "1",
                     "--out", str(tmp_path / "out")])
        assert code in (0, CHECK_FAILED)  # a random model has no mechanism; the code path is what is tested
        printed = capsys.readouterr().out
        for case in ("factual recall (one hop)", "addition (ones digit)", "greater-than (years)", "rhyme planning",
                     "paper's prompt: two-hop factual recall", "paper's prompt: addition", "paper's prompt: rhyme"):
            assert case in printed
        for case in ("two_hop", "addition", "rhyme"):  # the paper's prompts always run, so they always draw
            if case == "rhyme" and "the model stops after line 1" in printed:
                continue  # a random model with tied embeddings echoes the line break: a FAIL row, no graph
            assert (tmp_path / "out" / "paper" / case / "graph.png").stat().st_size > 1000
            assert (tmp_path / "out" / "paper" / case / "graph.json").is_file()
        return
    # the real-model checks on one variant each, without the gets-it-right filter (a random model gets
    # nothing right); transformers 5 swaps in the family's own tokenizer class on load, so hand ours over
    subject = Subject(model, tok, tc, family)
    out = tmp_path / "out"
    two_hop.check(subject, [(two_hop.one_hop_prompt("Dallas"), " Texas", "Dallas", two_hop.one_hop_prompt("Miami"),
                             " Florida")], out / "recall", case="factual recall (one hop)")
    addition.check(subject, [(7, 8)], out / "addition", prompt_for=addition.real_digit_prompt)
    greater_than.check(subject, [32], out / "greater_than")
    lead_in = [(rhyme.couplet(*rhyme.REAL_COUPLETS[0]), rhyme.couplet(*rhyme.REAL_COUPLETS[1]))]  # line 2 under way
    rhyme.check(subject, lead_in, out / "rhyme", judge=rhyme.real_judge, new_tokens=2, rivals=rhyme.real_rivals,
                away_counts=True)
    for case in ("recall", "addition", "greater_than", "rhyme"):
        assert (out / case / "graph.png").stat().st_size > 1000
        assert (out / case / "graph.json").is_file()


def test_real_variant_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real-model checks keep the variants the model gets right (on both sides of a swap or steer) and
    spread them over their range: carries and plain sums, states, decades."""
    tok, vocab = real_prompt_tokenizer()
    subject = Subject(tiny_model("gpt2", n_layers=1, d_model=16, vocab=vocab), tok, None, "fake")  # type: ignore[arg-type]
    right = {addition.real_digit_prompt(a, b)[0] for a in range(1, 10) for b in range(1, 10) if (a + b) % 3}
    monkeypatch.setattr(Subject, "gets_right", lambda self, prompt, answer: prompt in right)
    pairs = addition.real_pairs(subject, 6)
    assert len(pairs) == 6 and sum(a + b >= 10 for a, b in pairs) == 3
    for a, b in pairs:
        a2 = addition.steered_operand(a, b)
        assert (a + b) % 3 and a2 is not None and (a2 + b) % 3
    monkeypatch.setattr(Subject, "gets_right", lambda self, prompt, answer: "Miami" not in prompt)
    valid = [(a, b) for a in range(1, 10) for b in range(1, 10) if (addition.steered_operand(a, b) or 0) > 0]
    right_both = [(a, b) for a, b in valid if (a + b) % 3 and (addition.steered_operand(a, b) + b) % 3]
    assert (pairs.right, pairs.candidates) == (len(right_both), len(valid)) and pairs.describe().endswith("6 run")
    rows = two_hop.real_one_hop_prompts(subject)
    assert rows and all("Miami" not in r[0] and "Miami" not in r[3] for r in rows)
    assert len(rows) == rows.right < rows.candidates == sum(len(c) for c in two_hop.CITIES.values())
    assert {r[1] for r in rows} >= {" Texas", " Ohio"} and all(r[1] != r[4] for r in rows)


def test_steered_operand_keeps_the_carry() -> None:
    for a in range(10, 100):
        for b in range(100):
            a2 = addition.steered_operand(a, b)
            if a2 is not None:
                assert a2 // 10 == a // 10 and a2 != a
                assert (a % 10 + b % 10 >= 10) == (a2 % 10 + b % 10 >= 10)
                assert len(str(a + b)) == len(str(a2 + b)) and str(a + b)[:-1] == str(a2 + b)[:-1]


def test_control_group_stays_at_the_groups_positions() -> None:
    """A sparse code may leave no other feature at a group's (layer, position): the control then takes
    one at the same position in another layer, never one at a position the donor prompt lacks."""
    from types import SimpleNamespace

    from paper_cases.common import control_group

    features = torch.tensor([[0, 5, 1], [0, 5, 2], [1, 5, 7], [2, 5, 3], [0, 8, 4], [1, 9, 6]])
    t = SimpleNamespace(graph=SimpleNamespace(features=features))
    group = [(0, 5, 1), (0, 5, 2)]
    for seed in range(20):
        ctrl = control_group(t, group, seed=seed)  # type: ignore[arg-type]
        assert len(ctrl) == 2 and len(set(ctrl)) == 2
        assert all(f[1] == 5 and f not in group for f in ctrl)


@pytest.mark.parametrize("case", [
    "two_hop", "addition",
    pytest.param("rhyme", marks=pytest.mark.xfail(strict=True, reason=(
        "the organism plans at the newline (plan probe 192/192), but suppressing the graph's newline group "
        "derails line 2 instead of switching rhyme, and injecting another family's group rarely moves it "
        "(see docs/research/rhyme_planning.md)"))),
])
def test_checks_pass_on_the_bundled_organism(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The bundled organism shows the mechanism (and the random-group control does not)."""
    code = main([case, "-n", "4", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (tmp_path / case / "graph.png").stat().st_size > 1000
    assert code == 0, printed[-4000:]


def test_organism_artifacts_load_and_answer() -> None:
    """The committed organism loads with the project's own from_pretrained and its CLT fits it."""
    from clt_hub import Transcoder
    from clt_hub.models.loading import load_model
    from paper_cases.organism import CLT_DIR, MODEL_DIR, greedy

    model, tok = load_model(str(MODEL_DIR), local_files_only=True)
    tc = Transcoder.from_pretrained(CLT_DIR)
    assert (tc.n_layers, tc.d_model) == (model.config.n_layer, model.config.n_embd)
    assert tc.cfg.metrics["ce_recovered"] > 0.9
    assert greedy(model, tok, "calc : 3 6 + 5 9 =") == ["9", "5"]
    assert greedy(model, tok, "fact : the capital of the state containing Dallas is") == ["Austin"]


def test_clt_training_texts_keep_couplets_whole(tmp_path: Path) -> None:
    """What the CLT trains on is what the model reads: a couplet stays one document with its newline."""
    from clt_hub.texts import iter_texts
    from paper_cases.corpus import build
    from paper_cases.organism import write_documents

    docs = build(0).train[:200]
    assert sum("\n" in d for d in docs) > 10
    assert list(iter_texts(write_documents(tmp_path / "train.jsonl", docs))) == docs


def test_bundled_clt_reconstructs_the_couplet_newline() -> None:
    """The rhyme plan lives in the MLP outputs at line 1's newline. The bundled CLT must reconstruct
    them there as well as anywhere (a CLT trained on couplets cut at the newline had an error there
    about as large as the signal)."""
    from clt_hub import Transcoder
    from clt_hub.models.hooks import mlp_io
    from clt_hub.models.loading import load_model
    from paper_cases.corpus import RHYMES
    from paper_cases.organism import CLT_DIR, MODEL_DIR

    model, tok = load_model(str(MODEL_DIR), local_files_only=True)
    tc = Transcoder.from_pretrained(CLT_DIR)
    errors = []
    for family in RHYMES:
        ids = torch.tensor([tok(rhyme.organism_line(family, 0))["input_ids"]])
        with torch.no_grad():
            x, y = mlp_io(model, ids, tc.cfg.feature_input_hook, tc.cfg.feature_output_hook)
            x, y = x[0, -1], y[0, -1]  # the newline, every layer
            errors.append(((y - tc.decode(tc.encode(x), x)) ** 2).sum(-1) / (y ** 2).sum(-1))
    relative = torch.stack(errors).mean(0)
    assert (relative < 0.1).all(), relative


def test_newline_bottleneck_hides_line1_from_line2_only() -> None:
    """The training bottleneck: unset, the 4-D masks give the model's own causal+padding loss exactly;
    set, line 2 of a couplet loses sight of line 1's words and keeps the newline and the task prefix."""
    from clt_hub.models.loading import load_model
    from paper_cases.organism import MODEL_DIR, attention_masks, line1_span, padded_batch

    model, tok = load_model(str(MODEL_DIR), local_files_only=True)
    texts = ["poem : he saw a carrot and a habit \n chased the rabbit <eos>", "calc : 3 6 + 5 9 = 9 5 <eos>"]
    encoded = [tok(t)["input_ids"] for t in texts]
    poem, newline = tok.convert_tokens_to_ids(["poem", "\n"])
    spans = [line1_span(ids, poem, newline) for ids in encoded]
    assert spans == [(3, 10), None]
    ids, pad, labels = padded_batch(encoded, tok.pad_token_id)
    width = ids.shape[1]
    with torch.no_grad():
        plain = model(ids, attention_mask=pad, labels=labels).loss
        same = model(ids, attention_mask=attention_masks(encoded, width, spans, torch.tensor([False, False])),
                     labels=labels).loss
    assert torch.equal(plain, same)
    hidden = attention_masks(encoded, width, spans, torch.tensor([True, True]))
    couplet = hidden[0, 0] == 0  # may attend
    assert not couplet[11:, 3:10].any()                       # line 2 does not see "he saw a carrot and a habit"
    assert couplet[11:, :3].all() and couplet[11:, 10].all()  # it sees "<bos> poem :" and the newline
    assert torch.equal(couplet[:11, :11], torch.ones(11, 11, dtype=torch.bool).tril())  # line 1 is untouched
    assert torch.equal(hidden[1, 0, :len(encoded[1]), :len(encoded[1])] == 0,
                       torch.ones(len(encoded[1]), len(encoded[1]), dtype=torch.bool).tril())


@pytest.mark.parametrize("patch", ["hidden", "mlp0"])
def test_plan_probe_on_the_bundled_organism(patch: str) -> None:
    """Patching the newline's state (every block's output, or layer 0's MLP output alone: where the
    transcoder's features can reach it) from a line 1 with another cue moves line 2's end word to that
    line's plan: the bundled organism writes line 2 from what the newline holds."""
    from clt_hub.models.loading import load_model
    from paper_cases.organism import MODEL_DIR, plan_probe

    model, tok = load_model(str(MODEL_DIR), local_files_only=True)
    counts = plan_probe(model, tok, patch)
    assert counts["tried"] == 32 * 6  # every line-1 word, every ordered pair of cues for two other members
    assert counts["follows_newline"] + counts["follows_line1"] + counts["other"] == counts["tried"]
    assert counts["follows_newline"] > counts["tried"] / 2 > counts["follows_line1"]


def test_rhyme_finds_line_1_in_prompts_with_and_without_a_lead_in() -> None:
    """The plan is read at the line break that ends line 1, whether the prompt stops there (the organism, the
    paper's couplet) or goes on into line 2 (real models, which rhyme once line 2 is under way)."""
    tok, _ = real_prompt_tokenizer()
    stop = {int(tok.convert_tokens_to_ids("\n"))}
    for text, end in ((rhyme.couplet("The cat sat on a mat,", "And wore a funny"), "mat"),
                      (rhyme.couplet("The cat sat on a mat,"), "mat"), (rhyme.REAL_LINES[0][0], "it")):
        ids = torch.tensor(tok(text)["input_ids"])
        nl = rhyme._newline(ids, stop)
        assert tok.decode(ids[: nl + 1]).endswith("\n") and tok.decode(ids[nl - 1: nl]).strip() == ","
        assert rhyme._line1_end(text) == end
    assert rhyme._line1_end("poem : he saw a rabbit \n") == "rabbit"


def test_real_rhyme_judge_hears_rhymes_that_spelling_misses() -> None:
    """The real-model rhyme check judges by pronunciation (CMU dictionary), by spelling only for unknown words."""
    assert rhyme.rhymes("tree", "me") and rhyme.rhymes("star", "are") and rhyme.rhymes("rabbit", "habit")
    assert not rhyme.rhymes("hill", "cold") and not rhyme.rhymes("cough", "though")  # spelling would say yes
    assert rhyme.rhymes("qzxat", "vbxat") and not rhyme.rhymes("qzxat", "qzxal")  # not in the dictionary
    assert rhyme.real_judge("tree,", ["It", "sang", "for", "▁me."]) and not rhyme.real_judge("hill,", ["very", "cold"])
