"""The Space in a real browser: `python app.py` on 127.0.0.1, driven by headless Debian chromium through
Playwright. Trace a prompt on the organism, click a node and read its details, group features,
intervene and see the top token change, run a case study, read the transcoder info, and, once two
other users have traced on a Space capped at two graphs, be told the first graph was dropped;
screenshots of each tab go to $CLT_SPACE_SCREENSHOTS (default: a pytest temp folder). The time from
pressing Trace to the graph appearing is printed, not asserted."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-quic", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPT_TOKENS = 24
MAX_SESSIONS = 2
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is absent (apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python app.py` as a user runs it, on a free local port, offline (the barrage benchmark's server, with
    limits small enough to reach in a test)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_space_barrage import server as space_server

    limits = {"CLT_SPACE_MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS), "CLT_SPACE_MAX_CONTEXT_TEXTS": "100",
              "CLT_SPACE_MAX_SESSIONS": str(MAX_SESSIONS)}
    with space_server(limits, folder=tmp_path_factory.mktemp("app")) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("CLT_SPACE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def requests_seen() -> list[str]:
    return []


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page(browser, server: str, requests_seen: list[str]) -> object:  # type: ignore[no-untyped-def]
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(120_000)
    pg.on("request", lambda r: requests_seen.append(r.url))
    pg.goto(server)
    pg.wait_for_selector("#trace-btn")
    return pg


@pytest.fixture(scope="module")
def traced(page) -> float:  # type: ignore[no-untyped-def]
    """Press Trace on the default organism prompt; seconds until the graph's nodes are on the page."""
    page.get_by_role("tab", name="Trace").click()
    start = time.perf_counter()
    page.click("#trace-btn")
    page.wait_for_selector("#graph svg [data-node]")
    return time.perf_counter() - start


def tab(page, name: str) -> None:  # type: ignore[no-untyped-def]
    page.get_by_role("tab", name=name).click()


def shot(page, folder: Path, name: str) -> Path:  # type: ignore[no-untyped-def]
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    return path


def test_trace_draws_the_graph(page, traced: float, shots: Path, server: str,  # type: ignore[no-untyped-def]
                               capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\n[browser] Trace -> graph on the organism: {traced:.2f} s (pressing Trace to nodes on the page)")
    summary = page.inner_text("#summary")
    assert "Replacement score" in summary and "Austin" in summary
    nodes = page.locator("#graph svg [data-node]")
    assert nodes.count() > 20 and page.locator("#graph svg g.logit").count() >= 1
    assert page.locator("#graph svg line.edge").count() > 50
    # the graph.json download is the Neuronpedia file of the same pruned graph
    link = page.locator("#json-file a").first
    link.wait_for()
    href = link.get_attribute("href")
    assert href
    with urllib.request.urlopen(href if href.startswith("http") else server.rstrip("/") + href) as resp:
        data = json.loads(resp.read())
    assert {n["node_id"] for n in data["nodes"]} == {nodes.nth(i).get_attribute("data-node") for i in range(nodes.count())}
    page.locator("#png-file a").first.wait_for()


def test_click_a_node_for_its_details(page, traced: float, shots: Path) -> None:  # type: ignore[no-untyped-def]
    tab(page, "Trace")
    node = page.locator("#graph svg g.feature").first
    node_id = node.get_attribute("data-node")
    node.hover()
    assert page.inner_text("#graph .clt-hover") == node.get_attribute("data-label")
    node.click()
    page.wait_for_function(
        "id => document.querySelector('#details').innerText.includes(id)", arg=node_id)
    details = page.inner_text("#details")
    assert "Top logit effects" in details and "Top activating contexts" in details and "activation" in details
    assert "Strongest inputs" in details and "Strongest outputs" in details
    assert "sel" in (node.get_attribute("class") or "")
    shot(page, shots, "trace")


def test_group_features_into_supernodes(page, traced: float, shots: Path) -> None:  # type: ignore[no-untyped-def]
    tab(page, "Group")
    page.click("#accept-btn")
    page.wait_for_selector("#group-graph svg g.supernode")
    suggested = page.locator("#group-graph svg g.supernode").count()
    assert suggested >= 1
    # pick one more feature by clicking it in the graph, and name it
    feature = page.locator("#group-graph svg g.feature").first
    feature_id = feature.get_attribute("data-node")
    feature.click()
    page.wait_for_function("id => document.querySelector('#group-details').innerText.includes(id)", arg=feature_id)
    page.fill("#group-name textarea, #group-name input", "picked by hand")
    page.click("#add-btn")
    page.wait_for_selector("#group-graph svg g.supernode[data-node='supernode:picked by hand']")
    assert page.locator("#group-graph svg g.supernode").count() == suggested + 1
    assert "picked by hand" in page.inner_text("#supernodes")
    page.locator("#group-graph svg g.supernode").first.click()
    page.wait_for_function("document.querySelector('#group-details').innerText.includes('Supernode')")
    shot(page, shots, "group")


def test_intervention_changes_the_top_token(page, traced: float, shots: Path) -> None:  # type: ignore[no-untyped-def]
    tab(page, "Group")
    if page.locator("#group-graph svg g.supernode").count() == 0:
        page.click("#accept-btn")
        page.wait_for_selector("#group-graph svg g.supernode")
    tab(page, "Intervene")
    changed, previous = False, ""
    for i in range(3):  # the largest suggested groups, one at a time, multiplied by -2 (constrained)
        clear = page.locator("#iv-supernodes [title='Clear']")
        if clear.count():
            clear.first.click()
        page.click("#iv-supernodes input")
        options = page.locator("[role=option]")
        if options.count() <= i:
            break
        options.nth(i).click()
        page.keyboard.press("Escape")
        page.click("#iv-btn")
        page.wait_for_function(
            "prev => { const t = document.querySelector('#iv-summary').innerText;"
            " return t.includes('top token') && t !== prev; }", arg=previous)
        previous = page.inner_text("#iv-summary")
        before = page.inner_text("#iv-table [data-testid='cell-0-1']")
        after = page.inner_text("#iv-table [data-testid='cell-0-3']")
        assert before.strip() == "'Austin'"  # rank 1 without the intervention
        if after.strip() != before.strip():
            assert "→" in previous
            changed = True
            break
    assert changed, f"no suppressed supernode moved the answer; last: {previous}"
    assert "'Austin' →" in previous
    assert "original" in previous and "intervened" in previous
    shot(page, shots, "intervene")


def test_case_study_runs_live(page, shots: Path) -> None:  # type: ignore[no-untyped-def]
    tab(page, "Case studies")
    page.get_by_label("addition (ones digit)").check()
    number = page.locator("#n-variants input[type=number]")
    number.fill("1")
    number.press("Enter")
    page.click("#case-btn")
    page.wait_for_function("document.querySelector('#case-summary').innerText.includes('prompt variants pass')")
    summary = page.inner_text("#case-summary")
    assert "addition" in summary and ("PASS" in summary or "FAIL" in summary) and "/1 prompt variants pass" in summary
    assert page.locator("#case-table [role=grid]").get_attribute("aria-rowcount") == "2"  # header + one variant
    page.wait_for_selector("#case-figure img")
    shot(page, shots, "cases")


def test_transcoder_info(page, shots: Path) -> None:  # type: ignore[no-untyped-def]
    tab(page, "Transcoder info")
    page.click("#info-btn")
    page.wait_for_function("document.querySelector('#facts').innerText.includes('hook_resid_mid')")
    facts = page.inner_text("#facts")
    assert "features_per_layer" in facts and "512" in facts
    assert "ce_recovered" in page.inner_text("#metrics")
    assert "Cross-layer transcoder for clt_hub/organism" in page.inner_text("#card")
    shot(page, shots, "info")


def test_too_long_prompt_is_refused_in_words(page) -> None:  # type: ignore[no-untyped-def]
    tab(page, "Trace")
    page.fill("#prompt textarea", " ".join(["the"] * 40))
    page.click("#trace-btn")
    message = page.get_by_text(f"this Space traces at most {MAX_PROMPT_TOKENS}")
    message.first.wait_for()
    assert "Traceback" not in page.inner_text("body")


JSON_LINK = "() => document.querySelector('#json-file a')?.href ?? null"


def traced_and_saved(pg, before: str | None) -> None:  # type: ignore[no-untyped-def]
    """Wait for a new graph.json link: the last step after Trace (the downloads), so the order in which
    the sessions were last used (what the Space drops by) is the order of the calls, not of the threads."""
    pg.wait_for_function(f"old => ({JSON_LINK})() !== null && ({JSON_LINK})() !== old", arg=before)


def test_dropped_graph_is_explained(page, browser, server: str) -> None:  # type: ignore[no-untyped-def]
    """Two other users trace on this Space (capped at MAX_SESSIONS graphs): the first user's graph, the least
    recently used, is dropped, and their next click says so in words."""
    tab(page, "Trace")
    before = page.evaluate(JSON_LINK)  # the earlier tests' graph: wait for this one's, not that one
    page.fill("#prompt textarea", "calc : 3 6 + 5 9 =")
    page.click("#trace-btn")
    traced_and_saved(page, before)
    node = page.locator("#graph svg g.feature").first
    node.wait_for()
    others = []
    for _ in range(MAX_SESSIONS):
        other = browser.new_page()
        other.set_default_timeout(120_000)
        other.goto(server)
        other.click("#trace-btn")
        traced_and_saved(other, None)
        others.append(other)
    node.click()
    message = page.get_by_text("this graph was dropped to make room for newer sessions on this Space")
    message.first.wait_for()
    assert f"at most {MAX_SESSIONS} graphs" in message.first.inner_text() and "trace again" in message.first.inner_text()
    assert "Traceback" not in page.inner_text("body")
    others[-1].locator("#graph svg g.feature").first.click()  # the newest user's graph still answers
    others[-1].wait_for_function("document.querySelector('#details').innerText.includes('Top logit effects')")
    for other in others:
        other.close()


def test_nothing_leaves_the_machine(page, requests_seen: list[str]) -> None:  # type: ignore[no-untyped-def]
    hosts = {urlparse(u).hostname for u in requests_seen if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert requests_seen and hosts == {"127.0.0.1"}, hosts
