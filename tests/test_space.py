"""The Space's handlers (space.state) called directly, on the bundled organism: tracing, the graph
view, node details, supernodes, interventions, a live case study, transcoder info, and the plain-words
errors a public Space must give (long prompt, mismatched transcoder, unavailable model, Hub off,
paths outside local mode), and the cap on the graphs all users' sessions hold (count and memory, least
recently used dropped, the user told)."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import random_transcoder

import space as sp
from clt_hub.attribution.options import TraceOptions
from clt_hub.errors import ArtifactError, ConfigError, HubError
from space.state import SessionDropped, approx_bytes

DALLAS = "fact : the capital of the state containing Dallas is"
LIMITS = sp.Limits(max_prompt_tokens=24, max_context_texts=60, max_new_tokens=6, max_case_variants=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The organism's ops are tiny: one torch thread is fastest, and stays fast when other work shares the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> sp.Space:
    return sp.Space(LIMITS, scratch=tmp_path_factory.mktemp("space"))


@pytest.fixture(scope="module")
def organism() -> sp.Source:
    return sp.source_for(sp.ORGANISM, "", "", LIMITS)


@pytest.fixture(scope="module")
def traced(space: sp.Space, organism: sp.Source) -> sp.Session:
    return space.trace(DALLAS, organism)


def fresh(session: sp.Session) -> sp.Session:
    """The module's traced session with its own supernode list (tests that group must not leak)."""
    return dataclasses.replace(session, supernodes=[])


def test_trace_on_the_organism(space: sp.Space, traced: sp.Session) -> None:
    r = traced.result
    assert r.logit_texts[0] == "Austin"
    assert r.scores.replacement > 0.8 and r.scores.completeness > 0.9
    kept = traced.kept_features()
    assert len(kept) >= 10
    cum = [float(r.pruned.cumulative[traced.index[n]]) for n in kept]
    assert cum == sorted(cum)  # most influential first
    summary = space.summary_markdown(traced)
    assert "'Austin'" in summary and f"{r.scores.replacement:.3f}" in summary
    assert r.contexts, "the organism's corpus gives contexts for kept features"


def test_graph_view_has_every_kept_node_and_bounded_edges(space: sp.Space, traced: sp.Session) -> None:
    html = space.graph_html(traced)
    drawn = re.findall(r'data-node="([^"]+)"', html)
    kept_ids = [traced.records[i]["node_id"] for i in traced.kept()]
    assert sorted(drawn) == sorted(kept_ids)
    assert 0 < html.count('class="edge"') <= LIMITS.max_edges_drawn
    assert "<script" not in html and "${" not in html
    for tok in ("Dallas", "capital", "containing"):
        assert f">{tok}</text>" in html


def test_feature_details(space: sp.Space, traced: sp.Session, organism: sp.Source) -> None:
    from clt_hub.attribution.descriptions import top_tokens

    node = traced.kept_features()[0]
    d = space.node_details(traced, node)
    i = traced.index[node]
    g = traced.result.graph
    layer, pos, feat = g.features[i].tolist()
    assert d.kind == "feature" and d.activation == pytest.approx(float(g.activations[i]))
    loaded = space.load(organism)
    assert d.promotes[0][0] == top_tokens(loaded.model, loaded.tokenizer, loaded.transcoder, layer, [feat], k=1)[0][0]
    effects = [v for _, v in d.promotes]
    assert effects == sorted(effects, reverse=True) and effects[0] > 0 > d.suppresses[0][1]
    assert d.contexts and all(c["activation"] > 0 and c["text"].endswith(c["token"]) for c in d.contexts)
    # strongest inputs are the largest entries of the node's adjacency row
    row = g.adjacency[i].clone()
    row[i] = 0
    assert d.inputs[0][1] == pytest.approx(float(row[row.abs().argmax()]))
    assert d.outputs
    md = d.markdown()
    assert "Top logit effects" in md and "Top activating contexts" in md and node in md
    # by the weights alone: the de-embedding's top token and the strongest upstream feature by virtual weight
    from clt_hub.attribution.weights import de_embedding, top_upstream, virtual_weights

    de = de_embedding(loaded.model, loaded.transcoder, layer, feat, tokenizer=loaded.tokenizer)
    assert d.de_embedding[0] == (de.top[0].text, pytest.approx(de.top[0].weight))
    if layer > 0:
        ranked = top_upstream(virtual_weights(loaded.transcoder, layer, feat, loaded.model), 1)
        best = max(ranked.positive + ranked.negative, key=lambda u: abs(u.weight))
        assert d.by_weights[0] == (f"L{best.layer}#{best.feature}", pytest.approx(best.weight))
    assert "By the weights alone" in md
    # global weights over the Space's context texts (the organism's corpus), beside the virtual weights, for the most
    # influential kept feature above layer 0 (layer 0 has no upstream features)
    from clt_hub.attribution.weights import global_weights
    from space.details import GLOBAL_TOKENS

    node = next(n for n in traced.kept_features() if g.features[traced.index[n]][0] > 0)
    layer, _, feat = g.features[traced.index[node]].tolist()
    d = space.node_details(traced, node)
    texts = space.context_texts(loaded)
    assert texts
    glob = global_weights(loaded.model, loaded.tokenizer, loaded.transcoder, texts, layer, feat, GLOBAL_TOKENS)
    best = max(glob.top_twera.positive + glob.top_twera.negative, key=lambda u: abs(u.weight))
    assert d.by_global[0] == (f"L{best.layer}#{best.feature}", pytest.approx(best.weight))
    assert d.global_tokens == glob.tokens > 0 and "TWERA" in d.markdown() and d.by_weights


def test_a_node_with_qk_tracing_shows_why_its_head_attends(space: sp.Space, traced: sp.Session,
                                                          organism: sp.Source) -> None:
    """The Space traces with QK tracing on (SPACE_QK units); a node that carries one shows the head, the score and
    the top pairs and marginals, which are the split's own (recomputed here), named like other nodes."""
    from clt_hub.attribution.qk import Contributor, json_id, qk_query, record_qk, top_qk
    from clt_hub.models.loading import encode_prompt
    from space.text import md as escaped

    r = traced.result
    assert len(r.qk) == sp.state.SPACE_QK
    loaded = space.load(organism)
    rec = record_qk(loaded.model, loaded.transcoder, encode_prompt(loaded.tokenizer, DALLAS))
    for c in r.qk:
        d = space.node_details(traced, traced.records[c.node]["node_id"])
        split = top_qk(qk_query(rec, c.layer, c.query).pair(c.head, c.key), k=10)
        assert f"layer {c.layer} head {c.head}, query {c.query}" in d.qk_head
        assert f"score {split['total']:+.4g}" in d.qk_head

        def named(contributor: dict, side: str, layer: int = c.layer) -> str:
            """A graph node's name and label as the details panel gives it; the contributor's own id otherwise."""
            who = Contributor(**{key: v for key, v in contributor.items() if key not in ("label", "node_id")})
            cid = json_id(who, layer, side)
            return traced.describe(traced.index[cid]) if cid in traced.index else cid

        assert [v for *_, v in d.qk_pairs] == pytest.approx([p["value"] for p in split["top_pairs"]])
        assert [v for _, v in d.qk_query] == pytest.approx([m["value"] for m in split["top_query"]])
        assert [v for _, v in d.qk_key] == pytest.approx([m["value"] for m in split["top_key"]])
        for (q, k, _), p in zip(d.qk_pairs, split["top_pairs"], strict=True):
            assert q.startswith(named(p["query"], "q")) and k.startswith(named(p["key"], "k"))
        md = d.markdown()
        assert "Why the head attends" in md and escaped(d.qk_pairs[0][0]) in md and escaped(d.qk_key[0][0]) in md
    logit = space.node_details(traced, traced.records[r.graph.logit_index(0)]["node_id"])
    assert not logit.qk_head and "Why the head attends" not in logit.markdown()
    # a pair QK attribution refuses traces without it (here mismatched: attribution then names the problem)
    assert sp.state.qk_default(loaded.model, random_transcoder("clt", n_layers=4, d_model=32, d_sae=8)) == 0


def test_logit_token_and_unknown_node_details(space: sp.Space, traced: sp.Session) -> None:
    g = traced.result.graph
    logit = space.node_details(traced, traced.records[g.logit_index(0)]["node_id"])
    assert logit.kind == "logit" and logit.probability == pytest.approx(float(g.logit_probabilities[0]))
    assert logit.inputs and not logit.outputs
    token = space.node_details(traced, traced.records[g.token_index(9)]["node_id"])
    assert token.kind == "token" and "Dallas" in token.title and token.outputs and not token.inputs
    with pytest.raises(ConfigError, match="no node"):
        space.node_details(traced, "3_9999_1")


def test_grouping_and_collapsed_view(space: sp.Space, traced: sp.Session) -> None:
    s = fresh(traced)
    a, b, c = s.kept_features()[:3]
    space.add_supernode(s, "mine", [a, b])
    assert s.supernodes == [["mine", a, b]]
    space.add_supernode(s, "other", [b, c])  # b moves out of "mine"
    assert s.supernodes == [["mine", a], ["other", b, c]]
    collapsed = space.graph_html(s, collapsed=True)
    drawn = re.findall(r'data-node="([^"]+)"', collapsed)
    assert "supernode:mine" in drawn and "supernode:other" in drawn
    assert not {a, b, c} & set(drawn)
    assert len(drawn) == len(s.kept()) - 3 + 2
    details = space.node_details(s, "supernode:other")
    assert details.members == [b, c] and details.outputs
    space.remove_supernode(s, "mine")
    assert [x[0] for x in s.supernodes] == ["other"]
    with pytest.raises(ConfigError, match="name"):
        space.add_supernode(s, " ", [a])
    not_kept = next(r["node_id"] for i, r in enumerate(s.records)
                    if i < s.result.graph.n_features and not bool(s.result.pruned.node_mask[i]))
    with pytest.raises(ConfigError, match="not a feature kept"):
        space.add_supernode(s, "x", [not_kept])


def test_accepting_the_suggestion_and_downloads(space: sp.Space, traced: sp.Session) -> None:
    from clt_hub.attribution.graph_json import load

    s = fresh(traced)
    space.accept_suggestion(s)
    names = [g[0] for g in s.supernodes]
    assert names and len(set(names)) == len(names)
    assert [g[1:] for g in s.supernodes] == [g[1:] for g in s.result.suggested_supernodes]
    json_path, png_path = space.downloads(s)
    data = json.loads(Path(json_path).read_text())
    assert data["qParams"]["supernodes"] == s.supernodes
    assert len(load(json_path).nodes) == len(s.kept())
    assert png_path is not None and Path(png_path).stat().st_size > 5000


def test_intervention_changes_the_top_token(space: sp.Space, traced: sp.Session) -> None:
    s = fresh(traced)
    space.accept_suggestion(s)
    unchanged = space.intervene(s, [], [s.supernodes[0][0]], how="multiply", amount=1.0, new_tokens=3)
    assert [t for t, _ in unchanged.before] == [t for t, _ in unchanged.after] and not unchanged.top_changed
    assert [p for _, p in unchanged.before] == pytest.approx([p for _, p in unchanged.after], abs=1e-5)
    assert unchanged.continuation_before == unchanged.continuation_after
    assert unchanged.continuation_before.startswith("Austin")
    outcomes = [space.intervene(s, [], [name], how="multiply", amount=-2.0, mode="constrained", new_tokens=3)
                for name, *_ in s.supernodes[:3]]
    changed = [o for o in outcomes if o.top_changed]
    assert changed, "suppressing the suggested groups never moved the answer"
    assert changed[0].before[0][0] == "Austin" and changed[0].after[0][0] != "Austin"
    assert changed[0].table()[0][1] == "'Austin'"
    # features picked one by one: setting them at their positions is what the supernode path does too
    feats = s.supernodes[0][1:]
    by_feature = space.intervene(s, feats, [], how="multiply", amount=-2.0, new_tokens=0)
    assert [t for t, _ in by_feature.after] == [t for t, _ in outcomes[0].after]
    assert [p for _, p in by_feature.after] == pytest.approx([p for _, p in outcomes[0].after], abs=1e-5)


def test_intervention_errors(space: sp.Space, traced: sp.Session) -> None:
    with pytest.raises(ConfigError, match="at least one"):
        space.intervene(traced, [], [])
    with pytest.raises(ConfigError, match="CLT_SPACE_MAX_NEW_TOKENS"):
        space.intervene(traced, traced.kept_features()[:1], new_tokens=LIMITS.max_new_tokens + 1)
    with pytest.raises(ConfigError, match="finite"):
        space.intervene(traced, traced.kept_features()[:1], amount=float("nan"))
    with pytest.raises(ConfigError, match="no supernode"):
        space.intervene(traced, [], ["nope"])


def test_case_study_runs_live(space: sp.Space, organism: sp.Source) -> None:
    out = space.run_case(organism, "addition", 1)
    assert out.tried == 1 and len(out.rows) == 1 and "result" in out.columns
    assert out.verdict == ("PASS" if out.passed >= 0.75 * out.tried and out.passed > out.control_passed else "FAIL")
    assert out.figures and Path(out.figures[0]).stat().st_size > 5000
    assert out.verdict in out.markdown()
    with pytest.raises(ConfigError, match="CLT_SPACE_MAX_CASE_VARIANTS"):
        space.run_case(organism, "addition", LIMITS.max_case_variants + 1)
    with pytest.raises(ConfigError, match="unknown case"):
        space.run_case(organism, "poetry", 1)


def test_transcoder_info(space: sp.Space, organism: sp.Source) -> None:
    info = space.info(organism)
    facts = dict(info.rows())
    assert facts["layers"] == "4" and facts["d_model"] == "128" and facts["features_per_layer"] == "512"
    assert facts["input_hook"] == "hook_resid_mid" and facts["output_hook"] == "hook_mlp_out"
    assert "ce_recovered" in dict(info.metric_rows())
    assert info.card.startswith("# Cross-layer transcoder") and "library_name: clt-hub" in info.card_front_matter
    model = space.load(organism).model  # once loaded, its shape is shown beside the name
    assert space.info(organism).model_facts == {"source": organism.model, "type": model.config.model_type,
                                "layers": model.config.num_hidden_layers, "d_model": model.config.hidden_size,
                                "vocab": model.config.vocab_size}
    assert sp.Space(LIMITS).info(organism).model_facts == {"source": organism.model}  # not loaded: the name alone


def test_too_long_prompt_and_bad_settings(space: sp.Space, organism: sp.Source) -> None:
    long = " ".join(["the"] * 40)
    with pytest.raises(ConfigError, match=r"41 tokens long; this Space traces at most 24"):
        space.trace(long, organism)
    with pytest.raises(ConfigError, match="empty"):
        space.trace("  ", organism)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        space.trace(DALLAS, organism, TraceOptions(node_threshold=1.5))
    with pytest.raises(ConfigError, match="CLT_SPACE_MAX_FEATURE_NODES"):
        space.trace(DALLAS, organism, TraceOptions(max_feature_nodes=LIMITS.max_feature_nodes + 1))


def test_feature_budget_bounds_the_graph(space: sp.Space, organism: sp.Source) -> None:
    s = space.trace(DALLAS, organism, TraceOptions(max_feature_nodes=24), contexts=False)
    assert s.result.graph.n_features <= 24 and not s.result.contexts


def test_hub_off_and_paths_outside_local_mode(organism: sp.Source) -> None:
    closed = sp.Limits(allow_hub=False)
    assert sp.CUSTOM not in sp.pairs(closed) and sp.ORGANISM in sp.pairs(closed)
    with pytest.raises(ConfigError, match="CLT_SPACE_ALLOW_HUB=0"):
        sp.source_for(sp.CUSTOM, "org/model", "org/clt", sp.Limits(allow_hub=False, local_mode=True))
    for model, tc in ((organism.model, organism.transcoder), ("paper_cases/artifacts", "org/clt"),
                      ("~/model", "org/clt"), ("org/model", "../clt")):
        with pytest.raises(ConfigError, match="path on the server"):
            sp.source_for(sp.CUSTOM, model, tc, sp.Limits())
    local = sp.source_for(sp.CUSTOM, organism.model, organism.transcoder, sp.Limits(local_mode=True))
    assert (local.model, local.transcoder, local.organism) == (organism.model, organism.transcoder, False)
    with pytest.raises(ConfigError, match="does not exist"):
        sp.source_for(sp.CUSTOM, "/no/such/folder", organism.transcoder, sp.Limits(local_mode=True))
    with pytest.raises(ConfigError, match="unknown choice"):
        sp.source_for("not-a-registry-entry", "", "", sp.Limits())
    registry = sp.source_for("gemma-2-2b-clt-426k", "", "", closed)  # listed transcoders stay allowed
    assert registry.model == "google/gemma-2-2b"


def test_unavailable_model_and_mismatched_transcoder(tmp_path: Path, organism: sp.Source) -> None:
    space = sp.Space(sp.Limits(local_mode=True), scratch=tmp_path / "scratch")
    missing = sp.source_for(sp.CUSTOM, "nobody/no-such-model", organism.transcoder, space.limits)
    with pytest.raises(HubError, match="not available") as err:
        space.trace(DALLAS, missing)
    assert sp.user_message(err.value) == str(err.value)
    other = random_transcoder(n_layers=2, d_model=128, d_sae=16).save_pretrained(tmp_path / "clt2")
    wrong = sp.source_for(sp.CUSTOM, organism.model, str(other), space.limits)
    with pytest.raises(ConfigError, match="use a transcoder trained for this model"):
        space.trace(DALLAS, wrong)
    assert not space.is_loaded(wrong)
    assert sp.user_message(RuntimeError("bug")) is None
    assert "out of memory" in (sp.user_message(torch.OutOfMemoryError()) or "")


def test_cache_keeps_loaded_pairs(tmp_path: Path, organism: sp.Source) -> None:
    space = sp.Space(sp.Limits(cache_size=1, local_mode=True), scratch=tmp_path)
    first = space.load(organism)
    assert space.load(organism) is first
    twin = sp.source_for(sp.CUSTOM, organism.model, organism.transcoder, space.limits)
    space.load(twin)
    assert space.is_loaded(twin) and not space.is_loaded(organism)


def test_a_transcoder_name_resolves_once_for_loading_and_info(tmp_path: Path, organism: sp.Source,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading and the info tab use the folder `Space.transcoder_folder` found, looked up once per source."""
    import clt_hub.artifacts.hub as hub

    calls: list[str] = []
    real = hub.resolve
    monkeypatch.setattr(hub, "resolve", lambda name, **kw: calls.append(str(name)) or real(name, **kw))
    space = sp.Space(sp.Limits(), scratch=tmp_path)
    assert space.info(organism).facts
    assert calls == [organism.transcoder]
    loaded = space.load(organism)  # the loader is handed the folder itself (a local folder: no lookup)
    assert calls == [organism.transcoder, str(loaded.transcoder_path)]
    space.info(organism)
    assert loaded.transcoder_path == space.transcoder_folder(organism)
    assert len(calls) == 2


def test_limits_from_env() -> None:
    env = {"CLT_SPACE_MAX_PROMPT_TOKENS": "12", "CLT_SPACE_ALLOW_HUB": "0", "CLT_SPACE_LOCAL_MODE": "yes",
           "CLT_SPACE_CONTEXT_TEXTS": "texts.jsonl", "CLT_SPACE_CONCURRENCY": ""}
    lim = sp.Limits.from_env(env)
    assert (lim.max_prompt_tokens, lim.allow_hub, lim.local_mode, lim.context_texts, lim.concurrency) == \
        (12, False, True, "texts.jsonl", 1)
    assert (lim.max_sessions, lim.max_session_memory_mb, lim.session_ttl_s, lim.max_browser_sessions) == \
        (24, 512, 1800, 100)
    caps = sp.Limits.from_env({"CLT_SPACE_MAX_SESSIONS": "3", "CLT_SPACE_MAX_SESSION_MEMORY_MB": "100",
                               "CLT_SPACE_SESSION_TTL_S": "600"})
    assert (caps.max_sessions, caps.max_session_memory_mb, caps.session_ttl_s) == (3, 100, 600)
    with pytest.raises(ConfigError, match="CLT_SPACE_MAX_SESSIONS"):
        sp.Limits.from_env({"CLT_SPACE_MAX_SESSIONS": "0"})
    with pytest.raises(ConfigError, match="CLT_SPACE_MAX_NEW_TOKENS"):
        sp.Limits.from_env({"CLT_SPACE_MAX_NEW_TOKENS": "-3"})
    with pytest.raises(ConfigError, match="CLT_SPACE_OFFLINE"):
        sp.Limits.from_env({"CLT_SPACE_OFFLINE": "maybe"})


# -- the cap on sessions -------------------------------------------------------------------------------------
def _graph_bytes(session: sp.Session) -> int:
    r = session.result
    tensors = [t for t in (*vars(r.graph).values(), *vars(r.pruned).values()) if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _handlers(space: sp.Space, s: sp.Session) -> dict[str, object]:
    """Every Space method a user's action on a session reaches (app.py's handlers call these)."""
    return {"node_details": lambda: space.node_details(s, "0_0_0"), "node_choices": lambda: space.node_choices(s),
            "graph_html": lambda: space.graph_html(s), "collapsed": lambda: space.graph_html(s, collapsed=True),
            "summary": lambda: space.summary_markdown(s), "downloads": lambda: space.downloads(s),
            "add_supernode": lambda: space.add_supernode(s, "g", ["0_0_0"]),
            "accept_suggestion": lambda: space.accept_suggestion(s),
            "remove_supernode": lambda: space.remove_supernode(s, "g"), "rows": lambda: space.supernode_rows(s),
            "intervene": lambda: space.intervene(s, ["0_0_0"], new_tokens=1), "use": lambda: space.use(s),
            "kept_features": s.kept_features}


def test_sessions_over_the_cap_drop_the_least_recently_used(tmp_path: Path, organism: sp.Source) -> None:
    space = sp.Space(dataclasses.replace(LIMITS, max_sessions=2, max_session_memory_mb=10_000), scratch=tmp_path)
    a = space.trace(DALLAS, organism, contexts=False)
    b = space.trace(sp.ORGANISM_PROMPTS[1], organism, contexts=False)
    # memory accounting: each graph's tensors (edge rows, kept edges, ...) plus its node records, summed over kept
    for s in (a, b):
        assert s.nbytes == approx_bytes(s.result, s.records, s.index)
        assert _graph_bytes(s) < s.nbytes < 2 * _graph_bytes(s)
        assert s.nbytes > s.result.graph.adjacency.numel() * s.result.graph.adjacency.element_size()
    assert len(space.sessions) == 2 and space.sessions.total() == a.nbytes + b.nbytes
    space.node_details(a, a.kept_features()[0])  # a is now the most recently used: b goes first
    freed = weakref.ref(b.result.graph.adjacency)
    c = space.trace(sp.ORGANISM_PROMPTS[3], organism, contexts=False)
    assert space.sessions.kept() == [a, c] and space.sessions.total() == a.nbytes + c.nbytes
    assert not b.alive and a.alive and c.alive
    assert freed() is None, "a dropped graph's adjacency is still held"  # at once, not at the next gc
    for name, call in _handlers(space, b).items():
        with pytest.raises(SessionDropped, match=r"dropped to make room for newer sessions on this Space "
                                                 r"\(it keeps at most 2 graphs .*trace again") as err:
            call()  # type: ignore[operator]
        assert sp.user_message(err.value) == str(err.value), name  # app.py shows it as words
    # the kept ones still work
    node = c.kept_features()[0]
    assert space.node_details(c, node).node_id == node and space.graph_html(a).count("data-node=")
    out = space.intervene(c, [node], how="multiply", amount=0.0, new_tokens=1)
    assert out.before
    # gradio expiring a state (gr.State delete_callback) unregisters and releases it; other values are ignored
    space.forget(a)
    space.forget(None)
    assert space.sessions.kept() == [c] and not a.alive
    with pytest.raises(SessionDropped, match="expired; trace again"):
        space.use(a)
    # a graph its user replaced (no callback from gradio) leaves the registry once it is freed
    d = space.trace(DALLAS, organism, contexts=False)
    assert len(space.sessions) == 2
    del d  # no gc needed: nothing but the user's state leads to a graph
    assert space.sessions.kept() == [c] and space.sessions.total() == c.nbytes


def test_memory_cap_drops_all_but_the_newest(tmp_path: Path, organism: sp.Source) -> None:
    space = sp.Space(dataclasses.replace(LIMITS, max_sessions=10, max_session_memory_mb=1), scratch=tmp_path)
    first = space.trace(DALLAS, organism, contexts=False)
    assert first.nbytes > 2**20 and space.sessions.kept() == [first]  # the newest is kept even over the cap
    second = space.trace(DALLAS, organism, contexts=False)
    assert space.sessions.kept() == [second] and not first.alive
    with pytest.raises(SessionDropped, match="1 MB"):
        space.node_choices(first)
    assert space.sessions.dropped_count == 1


@pytest.mark.slow
def test_memory_after_100_sessions(tmp_path: Path, organism: sp.Source, capsys: pytest.CaptureFixture[str]) -> None:
    """100 users trace and keep their graphs (as gr.State would): with the cap, the process's memory stays
    near what the cap allows. Prints the RSS; benchmarks/bench_space_sessions.py measures the real app."""
    import psutil

    proc = psutil.Process()
    space = sp.Space(dataclasses.replace(LIMITS, max_sessions=8, max_session_memory_mb=64), scratch=tmp_path)
    space.load(organism)
    held: list[sp.Session] = []
    gc.collect()
    before = proc.memory_info().rss
    prompts = [f"fact : the capital of the state containing {w} is" for w in ("Dallas", "Tampa", "Miami")]
    for i in range(100):
        held.append(space.trace(prompts[i % 3] if i % 2 else sp.ORGANISM_PROMPTS[1], organism, contexts=False))
    gc.collect()
    after = proc.memory_info().rss
    kept = space.sessions.kept()
    with capsys.disabled():
        print(f"\n[space] 100 sessions, cap 8 graphs / 64 MB: RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB "
              f"({len(kept)} graphs kept, {space.sessions.total() / 2**20:.0f} MiB by their accounting)")
    assert kept == [s for s in held if s.alive] and kept[-1] is held[-1] and len(kept) <= 8
    assert space.sessions.total() <= 64 * 2**20
    assert after - before < (64 + 300) * 2**20  # without the cap: about 1.2 GB more


def test_space_pins_agree() -> None:
    """The Space installs gradio from README's sdk_version and the rest from requirements.txt; the tests
    run the version the pyproject extras pin. They must all be the same gradio."""
    import gradio

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    front = readme.split("---\n")[1] if readme.startswith("---\n") else ""
    assert re.search(r"^sdk: gradio$", front, re.M) and re.search(r"^app_file: app.py$", front, re.M)
    sdk = re.search(r"^sdk_version: (\S+)$", front, re.M)
    assert sdk, "README.md front matter has no sdk_version"
    pins = dict(line.split("==") for line in (root / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pyproject = (root / "pyproject.toml").read_text()
    assert pins["gradio"] == sdk[1] == gradio.__version__
    assert re.search(rf'^space = \[.*"gradio=={re.escape(sdk[1])}"', pyproject, re.M)  # the Space's extra
    assert re.findall(r'"gradio==([^"]+)"', pyproject) == [sdk[1], sdk[1]]  # ... and dev's


def test_the_real_model_clt_is_offered_once_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nox -s train_real` writes the Gemma CLT into real_out/; the picker offers it only when it is there."""
    import space.config as config

    monkeypatch.setattr(config, "REAL_CLT_DIR", tmp_path / "transcoder")
    assert sp.REAL not in sp.pairs(LIMITS)
    with pytest.raises(ConfigError, match="unknown choice"):
        sp.source_for(sp.REAL, "", "", LIMITS)
    (tmp_path / "transcoder").mkdir()
    (tmp_path / "transcoder" / "config.yaml").write_text("kind: clt\n")
    assert sp.pairs(LIMITS)[:2] == [sp.ORGANISM, sp.REAL]
    source = sp.source_for(sp.REAL, "", "", sp.Limits(allow_hub=False))
    assert (source.model, source.transcoder, source.local_files_only) == ("gemma-3-270m", str(tmp_path / "transcoder"),
                                                                         True)


def test_user_text_is_capped_before_any_work(space: sp.Space, traced: sp.Session, organism: sp.Source,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 37: a 10 MB prompt was tokenised in full (1.45 GB) before the token cap, and 1 MB supernode names,
    repeated on every edge of the collapsed view, killed the server. Both are refused before any work: the
    prompt before the model is even loaded."""
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for a prompt over the character cap")

    with monkeypatch.context() as m:
        m.setattr(space, "load", no_load)
        with pytest.raises(ConfigError, match=r"the prompt is 10,000,000 characters long; this Space takes at "
                                              r"most 2,000 \(\$CLT_SPACE_MAX_PROMPT_CHARS\)"):
            space.trace("x" * 10_000_000, organism)
    session = fresh(traced)
    with pytest.raises(ConfigError, match="the supernode name is 1,000,000 characters long"):
        space.add_supernode(session, "n" * 1_000_000, session.kept_features()[:2])
    assert session.supernodes == []
    with pytest.raises(ConfigError, match="the model name is 300 characters long"):
        sp.source_for(sp.CUSTOM, "m" * 300, "org/clt", LIMITS)


def test_errors_shown_to_visitors_do_not_name_server_folders(tmp_path: Path) -> None:
    """An error about a cached file or a scratch folder said where the Space keeps its files."""
    import tempfile

    from clt_hub.artifacts.hub import cache_root

    app_folder = Path(sp.__file__).resolve().parents[1]
    err = ArtifactError(f"{cache_root() / 'models' / 'x' / 'config.json'}: bad; also {app_folder / 'real_out'}, "
                        f"{Path(tempfile.gettempdir()) / 'scratch-1'} and {Path.home() / 'notes'}")
    shown = sp.user_message(err) or ""
    assert shown == ("<clt_hub cache>/models/x/config.json: bad; also <app>/real_out, <tmp>/scratch-1 and "
                     "~/notes"), shown
    assert sp.without_server_paths("no path here") == "no path here"


def test_importing_the_app_writes_nothing_beside_it() -> None:
    """gradio writes a type stub beside the file of every Component subclass it creates (app.pyi for app.py's
    Slider); app.py turns that off, so neither the tests nor a Space host write into the app's folder."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import gradio.component_meta as m\ncalls = []\nm.create_or_modify_pyi = lambda *a: calls.append(a[1])\n"
            "import app\nprint('stubs written for:', calls)")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stubs written for: []" in out.stdout
