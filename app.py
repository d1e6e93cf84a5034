"""The clt_hub Gradio Space: trace, explore, group, intervene and rerun the case studies in a browser.

`python app.py` serves it on http://127.0.0.1:7860 with the bundled organism, offline. This file
only lays out the page and wires events; what each button does is in space/ (state.py). Limits for a
public Space are environment variables (CLT_SPACE_*, see README "Gradio Space").
"""

from __future__ import annotations

import functools
import logging
import math
import os
import unittest.mock
from collections.abc import Callable
from typing import Any, TypeVar

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio is imported

import gradio as gr  # noqa: E402
import gradio.component_meta  # noqa: E402
import pandas as pd  # noqa: E402

import space as sp  # noqa: E402
from clt_hub.attribution.options import TraceOptions  # noqa: E402

log = logging.getLogger("clt_hub.app")
F = TypeVar("F", bound=Callable[..., Any])
SPACE = sp.Space()
LIMITS = SPACE.limits
if LIMITS.threads:
    import torch

    torch.set_num_threads(LIMITS.threads)
TRACKED = gr.Progress(track_tqdm=True)  # gradio hands each request its own tracker in their place
PROGRESS = gr.Progress()
PLACEHOLDER = "<div class='clt-hover'>Press Trace to draw the attribution graph.</div>"
INTRO = """# clt_hub: attribution graphs with cross-layer transcoders
Trace a prompt, click nodes to read them, group features into supernodes, intervene on them, and rerun the
paper's case studies. The bundled organism (a 4-layer word-level GPT-2 trained on a synthetic corpus, with a
512-feature CLT) runs on CPU in seconds; its prompts look like its corpus, e.g. `fact : the capital of the state
containing Dallas is`."""


def errors_for_users(fn: F) -> F:
    """Errors a user can cause become a plain message (gr.Error); anything else is logged and summarised."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure must reach the user as words, not a trace
            message = sp.user_message(exc)
            if message is None:
                log.exception("unexpected error in %s", fn.__name__)
                message = sp.without_server_paths(f"unexpected error ({type(exc).__name__}: {exc}); the server log "
                                                  "has the details")
            raise gr.Error(message, print_exception=False) from None

    return wrapper  # type: ignore[return-value]


# gradio writes a type stub (app.pyi) beside the file of every Component subclass as the class is created; a
# Space must not write into its own folder (read-only on some hosts, and the tests must write nothing there)
with unittest.mock.patch.object(gradio.component_meta, "create_or_modify_pyi", lambda *_: None):
    class Slider(gr.Slider):
        """gr.Slider, whose value must be a number: gradio's own check lets NaN through (to a handler's int())
        and fails on text with "The upstream Gradio app has raised an exception", which says nothing. A template
        (is_template), so the page draws it as gradio's slider."""

        is_template = True

        def preprocess(self, payload: Any) -> float:
            if isinstance(payload, bool) or not isinstance(payload, (int, float)) or math.isnan(payload):
                shown = repr(payload) if len(repr(payload)) <= 40 else f"a {type(payload).__name__}"
                raise gr.Error(f"{self.label}: give a number from {self.minimum:g} to {self.maximum:g}, not {shown}",
                               print_exception=False)
            return super().preprocess(payload)


def reporter(progress: gr.Progress) -> sp.Progress:
    return lambda fraction, message: progress(fraction, desc=message)


def need(session: sp.Session | None) -> sp.Session:
    """The user's session, marked as just used; words instead of a crash when there is none or the Space
    dropped its graph to make room for newer ones (sp.SessionDropped, shown through errors_for_users)."""
    if session is None:
        raise gr.Error(f"trace a prompt first (Trace tab); a traced graph is forgotten {LIMITS.session_ttl_s // 60} "
                       "minutes after its last change, or sooner when this Space needs room for newer ones",
                       print_exception=False)
    return SPACE.use(session)


def group_view(session: sp.Session) -> tuple[Any, ...]:
    """Everything that shows the supernodes: both graphs, the table and the pickers."""
    names = [s[0] for s in session.supernodes]
    return (session, SPACE.graph_html(session), SPACE.graph_html(session, collapsed=True),
            pd.DataFrame(SPACE.supernode_rows(session), columns=["supernode", "features", "members"]),
            gr.update(choices=names, value=None), gr.update(choices=names, value=[]))


@errors_for_users
def do_trace(prompt: str, pick: str, model: str, transcoder: str, node_threshold: float, edge_threshold: float,
             max_nodes: float, contexts: bool, progress: gr.Progress = TRACKED) -> tuple[Any, ...]:
    source = sp.source_for(pick, model, transcoder, LIMITS)
    options = TraceOptions(node_threshold=node_threshold, edge_threshold=edge_threshold, max_feature_nodes=int(max_nodes))
    session = SPACE.trace(prompt, source, options, contexts=contexts, report=reporter(progress))
    choices = SPACE.node_choices(session)
    n = len(session.result.suggested_supernodes)
    suggestion = (f"The automatic grouping suggests **{n} supernodes** (features whose outgoing effects are alike)."
                  if n else "No grouping suggestion for this graph.")
    return (*group_view(session), SPACE.summary_markdown(session), gr.update(choices=choices, value=None),
            "Click a node in the graph (or pick one above) for its details.", gr.update(choices=choices, value=[]),
            gr.update(choices=choices, value=[]), suggestion)


@errors_for_users
def do_downloads(session: sp.Session | None, progress: gr.Progress = PROGRESS) -> tuple[Any, Any]:
    if session is None:
        return None, None
    return SPACE.downloads(need(session), report=reporter(progress))


@errors_for_users
def on_graph_click(session: sp.Session | None, evt: gr.EventData) -> tuple[Any, Any]:
    node = getattr(evt, "node", None)
    if session is None or not node:
        return gr.skip(), gr.skip()
    details = SPACE.node_details(need(session), node).markdown()  # checks the node id (text, not too long) first
    picked = node if node in session.index else None
    return details, gr.update(value=picked) if picked else gr.skip()


@errors_for_users
def on_node_pick(session: sp.Session | None, node: str | None) -> str:
    if session is None or not node:
        return ""
    return SPACE.node_details(need(session), node).markdown()


@errors_for_users
def on_group_click(session: sp.Session | None, members: list[str] | None, evt: gr.EventData) -> tuple[Any, Any]:
    """A click on a feature adds it to (or removes it from) the selection; any click shows the details."""
    node = getattr(evt, "node", None)
    if session is None or not node:
        return gr.skip(), gr.skip()
    session = need(session)
    chosen = list(members or [])
    if node in session.kept_features():
        chosen = [m for m in chosen if m != node] if node in chosen else [*chosen, node]
    return gr.update(value=chosen), SPACE.node_details(session, node).markdown()


@errors_for_users
def do_accept(session: sp.Session | None) -> tuple[Any, ...]:
    s = need(session)
    SPACE.accept_suggestion(s)
    return group_view(s)


@errors_for_users
def do_add(session: sp.Session | None, name: str, members: list[str] | None) -> tuple[Any, ...]:
    s = need(session)
    SPACE.add_supernode(s, name, members or [])
    return (*group_view(s), gr.update(value=[]), "")


@errors_for_users
def do_remove(session: sp.Session | None, name: str | None) -> tuple[Any, ...]:
    s = need(session)
    SPACE.remove_supernode(s, name or "")
    return group_view(s)


@errors_for_users
def do_intervene(session: sp.Session | None, features: list[str] | None, supernodes: list[str] | None, how: str,
                 amount: float, mode: str, new_tokens: float,
                 progress: gr.Progress = PROGRESS) -> tuple[Any, Any]:
    out = SPACE.intervene(need(session), features or [], supernodes or [], how=how,  # type: ignore[arg-type]
                          amount=amount, mode=mode, new_tokens=int(new_tokens),  # type: ignore[arg-type]
                          report=reporter(progress))
    return out.markdown(), pd.DataFrame(out.table(), columns=["rank", "before", "p before", "after", "p after"])


@errors_for_users
def do_case(pick: str, model: str, transcoder: str, case: str, n: float,
            progress: gr.Progress = PROGRESS) -> tuple[Any, Any, Any]:
    source = sp.source_for(pick, model, transcoder, LIMITS)
    out = SPACE.run_case(source, case, int(n), report=reporter(progress))
    return out.markdown(), pd.DataFrame(out.rows, columns=out.columns), out.figures[0] if out.figures else None


@errors_for_users
def do_info(pick: str, model: str, transcoder: str) -> tuple[Any, Any, Any, Any]:
    info = SPACE.info(sp.source_for(pick, model, transcoder, LIMITS))
    return (pd.DataFrame(info.rows(), columns=["property", "value"]),
            pd.DataFrame(info.metric_rows(), columns=["metric", "value"]), info.card, info.card_front_matter)


def graph_view(elem_id: str) -> gr.HTML:
    """An attribution-graph panel: SVG from Space.graph_html, clicks reported as events with the node id."""
    return gr.HTML(PLACEHOLDER, js_on_load=sp.GRAPH_JS, css_template=sp.GRAPH_CSS, elem_id=elem_id)


def build() -> gr.Blocks:
    custom = "Hub repo id" + (" or folder" if LIMITS.local_mode else "")
    with gr.Blocks(title="clt_hub: circuit tracing with cross-layer transcoders", delete_cache=(3600, 7200)) as demo:
        # a user's graph is forgotten $CLT_SPACE_SESSION_TTL_S after its last change (SPACE.forget lets go of it
        # then); SPACE.sessions caps how many graphs all users hold at once, dropping the least recently used
        session = gr.State(None, time_to_live=LIMITS.session_ttl_s, delete_callback=SPACE.forget)
        gr.Markdown(INTRO)
        with gr.Row():
            pick = gr.Dropdown(sp.pairs(LIMITS), value=sp.ORGANISM, label="Model + transcoder", scale=2,
                               elem_id="pick")
            model_box = gr.Textbox(label=f"Model ({custom})", visible=False, scale=2)
            tc_box = gr.Textbox(label=f"Transcoder ({custom} or registry name)", visible=False, scale=2)
        pick.change(lambda p: (gr.update(visible=p == sp.CUSTOM),) * 2, pick, [model_box, tc_box])

        with gr.Tabs():
            with gr.Tab("Trace", id="trace"):
                with gr.Row():
                    prompt = gr.Textbox(sp.ORGANISM_PROMPTS[0], label="Prompt", lines=2, scale=4, elem_id="prompt")
                    trace_btn = gr.Button("Trace", variant="primary", scale=1, elem_id="trace-btn")
                gr.Examples([[p] for p in sp.ORGANISM_PROMPTS], inputs=prompt, label="Organism prompts")
                with gr.Row():
                    node_t = Slider(0.1, 1.0, TraceOptions.node_threshold, step=0.01, label="Node threshold (influence kept)")
                    edge_t = Slider(0.1, 1.0, TraceOptions.edge_threshold, step=0.005, label="Edge threshold (influence kept)")
                    max_nodes = Slider(16, LIMITS.max_feature_nodes, LIMITS.max_feature_nodes, step=1,
                                       label="Max feature nodes")
                    contexts = gr.Checkbox(True, label="Top activating contexts")
                with gr.Row():
                    with gr.Column(scale=3):
                        graph = graph_view("graph")
                    with gr.Column(scale=2):
                        summary = gr.Markdown(elem_id="summary")
                        node_pick = gr.Dropdown([], label="Node (or click one in the graph)", elem_id="node-pick")
                        details = gr.Markdown(elem_id="details")
                with gr.Row():
                    json_file = gr.File(label="graph.json (Neuronpedia / circuit-tracer frontend)", elem_id="json-file")
                    png_file = gr.File(label="graph.png", elem_id="png-file")

            with gr.Tab("Group", id="group"):
                suggestion = gr.Markdown("Trace a prompt first.", elem_id="suggestion")
                accept_btn = gr.Button("Accept the suggested grouping", elem_id="accept-btn")
                with gr.Row():
                    members = gr.Dropdown([], multiselect=True, label="Features to group (or click them below)",
                                          scale=3, elem_id="members")
                    group_name = gr.Textbox(label="Supernode name", scale=1, elem_id="group-name")
                    add_btn = gr.Button("Make supernode", scale=1, elem_id="add-btn")
                with gr.Row():
                    remove_pick = gr.Dropdown([], label="Supernode", scale=3)
                    remove_btn = gr.Button("Remove supernode", scale=1)
                table = gr.Dataframe(headers=["supernode", "features", "members"], interactive=False,
                                     elem_id="supernodes")
                with gr.Row():
                    with gr.Column(scale=3):
                        group_graph = graph_view("group-graph")
                    with gr.Column(scale=2):
                        group_details = gr.Markdown(elem_id="group-details")

            with gr.Tab("Intervene", id="intervene"):
                gr.Markdown("Change features of the traced prompt and compare the next-token prediction. "
                            "*Constrained*: the graph's linear model (attention and other features frozen); "
                            "*open*: the replacement model runs for real and downstream features respond.")
                with gr.Row():
                    iv_features = gr.Dropdown([], multiselect=True, label="Features", elem_id="iv-features")
                    iv_supernodes = gr.Dropdown([], multiselect=True, label="Supernodes", elem_id="iv-supernodes")
                with gr.Row():
                    how = gr.Radio(["multiply", "set"], value="multiply", label="Change")
                    amount = gr.Number(-2.0, label="by / to", elem_id="amount")
                    mode = gr.Radio(["constrained", "open"], value="constrained", label="Mode")
                    new_tokens = Slider(0, LIMITS.max_new_tokens, min(8, LIMITS.max_new_tokens), step=1,
                                        label="Continuation tokens")
                iv_btn = gr.Button("Intervene", variant="primary", elem_id="iv-btn")
                iv_summary = gr.Markdown(elem_id="iv-summary")
                iv_table = gr.Dataframe(headers=["rank", "before", "p before", "after", "p after"], interactive=False,
                                        elem_id="iv-table")

            with gr.Tab("Case studies", id="cases"):
                gr.Markdown("The paper's three checks (paper_cases), run live: each finds a feature group from the "
                            "graph, intervenes on it, and compares with random groups of the same size and places.")
                with gr.Row():
                    case = gr.Radio([(label, key) for key, label in sp.CASES.items()], value="addition",
                                    label="Case", elem_id="case")
                    n_variants = Slider(1, LIMITS.max_case_variants, min(2, LIMITS.max_case_variants), step=1,
                                        label="Prompt variants", elem_id="n-variants")
                    case_btn = gr.Button("Run the check", variant="primary", elem_id="case-btn")
                case_summary = gr.Markdown(elem_id="case-summary")
                case_table = gr.Dataframe(interactive=False, elem_id="case-table", wrap=True)
                case_figure = gr.Image(type="filepath", label="graph with the group found", elem_id="case-figure")

            with gr.Tab("Transcoder info", id="info"):
                info_btn = gr.Button("Show the picked transcoder", elem_id="info-btn")
                with gr.Row():
                    facts = gr.Dataframe(headers=["property", "value"], interactive=False, elem_id="facts")
                    metrics = gr.Dataframe(headers=["metric", "value"], interactive=False, elem_id="metrics")
                card = gr.Markdown(elem_id="card")
                front = gr.Code(language="yaml", label="model card front matter")

        group_outputs = [session, graph, group_graph, table, remove_pick, iv_supernodes]
        trace_event = dict(fn=do_trace, inputs=[prompt, pick, model_box, tc_box, node_t, edge_t, max_nodes, contexts],
                           outputs=[*group_outputs, summary, node_pick, details, members, iv_features, suggestion])
        for trigger in (trace_btn.click, prompt.submit):
            trigger(**trace_event).then(do_downloads, session, [json_file, png_file])  # type: ignore[arg-type]
        graph.click(on_graph_click, session, [details, node_pick])
        node_pick.input(on_node_pick, [session, node_pick], details)
        group_graph.click(on_group_click, [session, members], [members, group_details])
        accept_btn.click(do_accept, session, group_outputs).then(do_downloads, session, [json_file, png_file])
        add_btn.click(do_add, [session, group_name, members], [*group_outputs, members, group_name]).then(
            do_downloads, session, [json_file, png_file])
        remove_btn.click(do_remove, [session, remove_pick], group_outputs).then(
            do_downloads, session, [json_file, png_file])
        iv_btn.click(do_intervene, [session, iv_features, iv_supernodes, how, amount, mode, new_tokens],
                     [iv_summary, iv_table])
        case_btn.click(do_case, [pick, model_box, tc_box, case, n_variants], [case_summary, case_table, case_figure])
        info_btn.click(do_info, [pick, model_box, tc_box], [facts, metrics, card, front])
        demo.load(do_info, [pick, model_box, tc_box], [facts, metrics, card, front])
    demo.queue(default_concurrency_limit=LIMITS.concurrency, max_size=LIMITS.max_queue)
    return demo


THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts
demo = build()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:  # warm the cache so the first trace is quick; failures show up again, as words, on first use
        SPACE.load(sp.source_for(sp.ORGANISM, "", "", LIMITS))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not preload the organism: %s", exc)
    # gradio keeps each browser session's outputs (graph SVGs included) until this many sessions, never by time
    # request bodies over $CLT_SPACE_MAX_REQUEST_KB are refused before gradio reads (and keeps) them
    from starlette.middleware import Middleware

    too_large = (f"this Space takes at most {LIMITS.max_request_kb * 1024:,} ($CLT_SPACE_MAX_REQUEST_KB): prompts of "
                 f"at most {LIMITS.max_prompt_chars:,} characters, names of at most {LIMITS.max_name_chars:,}")
    demo.launch(theme=THEME, state_session_capacity=LIMITS.max_browser_sessions,
                app_kwargs={"middleware": [Middleware(sp.RequestSizeLimit, max_bytes=LIMITS.max_request_kb * 1024,
                                                      message=too_large)]})
