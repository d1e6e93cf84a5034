"""The `clt-hub` command line."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clt_hub.attribution.options import TraceOptions
from clt_hub.circuits.cli import circuit_app
from clt_hub.config import Architecture
from clt_hub.errors import CltHubError, ConfigError
from clt_hub.training.config import TrainConfig

app = typer.Typer(
    name="clt-hub",
    help="Download, inspect, convert and publish transcoders; trace attribution graphs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(circuit_app, name="circuit")
console = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


class Layout(str, enum.Enum):
    native = "native"
    circuit_tracer = "circuit-tracer"
    sae_lens = "sae-lens"


class Mode(str, enum.Enum):
    constrained = "constrained"
    open = "open"

Revision = Annotated[str | None, typer.Option("--revision", "-r", help="Branch, tag or commit to pin.")]
CacheDir = Annotated[Path | None, typer.Option(help="Hub cache folder (default: $HF_HOME/hub).")]
Offline = Annotated[bool, typer.Option("--offline", help="Use the local cache only; never touch the network.")]


def friendly(fn: F) -> F:
    """Show our errors as one red line and exit 1, never as a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CltHubError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # a path the user gave: missing, a file where a folder belongs, read-only, disk full
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            err.print(f"[bold red]error:[/] {escape((exc.strerror or str(exc)) + where)}", highlight=False,
                      soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly
def download(
    repo: Annotated[str, typer.Argument(help="Hub repo id (org/name) or a name from `clt-hub list`.")],
    revision: Revision = None,
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option("--force", help="Re-download even if cached.")] = False,
) -> None:
    """Download a transcoder into the Hub cache and print its local folder."""
    from clt_hub.artifacts.hub import folder_size, human_size, resolve
    from clt_hub.artifacts.layouts import detect

    path = resolve(repo, revision=revision, cache_dir=cache_dir, force_download=force)
    layout = detect(path)
    err.print(f"[green]downloaded[/] {repo} ({layout}, {human_size(folder_size(path))})")
    console.print(str(path), highlight=False, soft_wrap=True)


@app.command()
@friendly
def info(
    source: Annotated[str, typer.Argument(help="Local folder, Hub repo id or registry name.")],
    revision: Revision = None,
    cache_dir: CacheDir = None,
    offline: Offline = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show a transcoder's shapes, hooks, model, dtype, size on disk and metrics."""
    from clt_hub.artifacts.hub import describe, human_size, resolve

    facts = describe(resolve(source, revision=revision, cache_dir=cache_dir, local_files_only=offline))
    if as_json:
        console.print_json(json.dumps(facts))
        return
    from clt_hub.artifacts.modelcard import metric_label

    table = Table(title=escape(source), show_header=False, title_justify="left")
    for key, value in facts.items():
        if key == "metrics":
            continue
        if key == "size_on_disk":
            shown = human_size(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            shown = f"{value:,}"
        else:
            shown = str(value) if value not in ("", None) else "(not recorded)"
        table.add_row(key, escape(shown))
    console.print(table)
    if facts["metrics"]:
        mt = Table(title="metrics", title_justify="left")
        mt.add_column("metric")
        mt.add_column("key")
        mt.add_column("value", justify="right")
        for k, v in facts["metrics"].items():
            mt.add_row(escape(metric_label(k)), escape(k), f"{v:.4g}" if isinstance(v, float) else escape(str(v)))
        console.print(mt)


@app.command()
@friendly
def convert(
    src: Annotated[str, typer.Argument(help="Folder, Hub repo id or registry name to read.")],
    dst: Annotated[Path, typer.Argument(help="Folder to write (written atomically).")],
    to: Annotated[Layout, typer.Option("--to", help="Layout to write: native, circuit-tracer or sae-lens.")] = Layout.native,
    revision: Revision = None,
    dtype: Annotated[str | None, typer.Option(help="Cast weights, e.g. bfloat16 (default: keep).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact at DST.")] = False,
) -> None:
    """Convert between native, circuit-tracer and SAE-Lens layouts (also reads GemmaScope params.npz)."""
    from clt_hub.artifacts.hub import folder_size, human_size
    from clt_hub.config import DTYPES
    from clt_hub.transcoders.transcoder import Transcoder

    if dtype is not None and dtype not in DTYPES:  # before SRC is read or downloaded
        raise typer.BadParameter(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    model = Transcoder.from_pretrained(src, revision=revision, dtype=dtype)
    out = model.save_pretrained(dst, layout=to.value, overwrite=overwrite)
    console.print(f"[green]wrote[/] {out} ({to.value}, {human_size(folder_size(out))})")


@app.command()
@friendly
def push(
    folder: Annotated[Path, typer.Argument(help="Artifact folder to publish.", exists=True, file_okay=False)],
    repo: Annotated[str, typer.Argument(help="Target Hub repo id (org/name); created if missing.")],
    revision: Annotated[str | None, typer.Option("--revision", "--branch", help="Branch to push to (created if missing).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
) -> None:
    """Publish an artifact folder to the Hub (checked loadable first), with a model card."""
    from clt_hub.artifacts.hub import push_folder

    url = push_folder(folder, repo, revision=revision, private=private or None, commit_message=message,
                      create_pr=create_pr)
    console.print(f"[green]pushed[/] {folder} -> {url}")


@app.command(name="list")
@friendly
def list_known() -> None:
    """List known pretrained transcoders (extend with $CLT_HUB_REGISTRY or ~/.config/clt_hub/registry.yaml)."""
    from clt_hub.artifacts.registry import entries

    rows = [(e.name, f"{e.repo_id}@{e.revision}", e.model, e.kind, e.description) for e in entries().values()]
    organism = Path("paper_cases/artifacts")
    if console.is_terminal:
        table = Table("name", "repo", "model", "kind", "description")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # piped: whole names, one tab-separated line each
        for row in rows:
            print("\t".join(row))
    if (organism / "clt").is_dir():
        console.print(f"bundled with this repository: the model organism, --model {organism / 'model'} "
                      f"--transcoder {organism / 'clt'} (offline)", highlight=False, soft_wrap=True)


@app.command(name="trace")
@friendly
def trace_cmd(
    prompt: Annotated[str, typer.Argument(help="Text to trace.")],
    model: Annotated[str, typer.Option("--model", help="transformers model id or local folder.")],
    transcoder: Annotated[str, typer.Option("--transcoder", help="Transcoder repo id, registry name or folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for graph.json and summary.txt.")] = Path("graph_out"),
    node_threshold: Annotated[float, typer.Option(help="Keep nodes up to this cumulative influence (0..1).")] = TraceOptions.node_threshold,
    edge_threshold: Annotated[float, typer.Option(help="Keep edges up to this cumulative influence (0..1).")] = TraceOptions.edge_threshold,
    max_logits: Annotated[int, typer.Option(min=1, help="Most logit targets (up to 95% probability).")] = TraceOptions.max_logits,
    batch_size: Annotated[int, typer.Option(min=1, help="Targets per backward pass.")] = TraceOptions.batch_size,
    max_feature_nodes: Annotated[int | None, typer.Option(min=1, help="Keep only this many features, chosen by influence (default: all).")] = None,
    target: Annotated[list[str] | None, typer.Option("--target", help="Attribute this single-token text instead of the top logits (repeatable).")] = None,
    logit_diff: Annotated[list[str] | None, typer.Option("--logit-diff", help="'A|B': attribute logit(A) - logit(B), e.g. ' Austin| Dallas' (repeatable).")] = None,
    supernodes: Annotated[bool, typer.Option("--supernodes", help="Put the suggested supernode groups into graph.json.")] = False,
    contexts: Annotated[str | None, typer.Option("--contexts", help="Texts (.txt/.jsonl/folder/dataset name) to find each kept feature's top activating contexts in; written to contexts.json.")] = None,
    text_field: Annotated[str, typer.Option(help="Text column/field of --contexts.")] = "text",
    shard_decoders: Annotated[bool, typer.Option("--shard-decoders", help="Under torchrun: each process keeps only its share of every decoder (features split evenly), for CLTs whose decoders do not fit one device; the active features' rows are exchanged only while they are read.")] = False,
    qk: Annotated[int, typer.Option("--qk", min=0, help="Explain the N (layer, head, query, key) that carry the most cross-position influence with exact QK attribution, written into graph.json (0: off).")] = TraceOptions.qk,
    offline: Offline = False,
) -> None:
    """Trace an attribution graph for PROMPT; write Neuronpedia-compatible graph JSON and a summary.

    Under `torchrun --nproc_per_node N` the backward passes are split over the N processes (gloo on CPU, NCCL on
    GPUs); the graph is the same as one process's and only the first process writes it."""
    from clt_hub.attribution.trace import target_ids, trace, write
    from clt_hub.distributed import init_distributed, rank_world
    from clt_hub.models.loading import check_prompt_text, load
    from clt_hub.texts import check_source, iter_texts
    from clt_hub.transcoders.sharded import shard_decoders as shard

    check_prompt_text(prompt)
    diffs = _logit_diffs(logit_diff or [])
    options = TraceOptions(node_threshold=node_threshold, edge_threshold=edge_threshold, max_logits=max_logits,
                           batch_size=batch_size, max_feature_nodes=max_feature_nodes, targets=tuple(target or ()),
                           logit_diffs=tuple(diffs), supernodes=supernodes, qk=qk)
    early, _ = _prompt_before_loading(model, prompt)
    if early is not None:  # the targets, before any weights load
        target_ids(early, target, diffs)
    if contexts:  # a typo here would otherwise surface after attribution
        check_source(contexts, text_field=text_field, what="--contexts", progress=True)
    _writable_folder(out)  # before any work, so a bad --out loses nothing
    init_distributed()
    rank, world = rank_world()
    if shard_decoders and world == 1:
        raise typer.BadParameter("--shard-decoders splits decoders over the processes of torchrun; this is one "
                                 "process. Run under torchrun --nproc_per_node N, or leave the flag out")
    quiet = rank > 0
    with console.status("loading model and transcoder") if not quiet else contextlib.nullcontext():
        lm, tok, tc = load(model, transcoder, local_files_only=offline)  # big CLTs stay on disk: a shard reads its rows
        tc = shard(tc) if shard_decoders else tc
    with console.status(f"attributing on {world} processes" if world > 1 else "attributing") if not quiet else \
            contextlib.nullcontext():
        result = trace(prompt, lm, tok, tc, options, transcoder_name=transcoder,
                       context_texts=iter_texts(contexts, text_field=text_field) if contexts else None)
    if quiet:
        return
    _show_trace(result, write(result, out))


def _show_trace(result: Any, folder: Path) -> None:
    """The summary of a written trace and the files written."""
    console.print(result.summary(), highlight=False, markup=False)  # a prompt may hold [brackets]
    written = [folder / n for n in ("graph.json", "summary.txt", "graph.png", "contexts.json") if (folder / n).exists()]
    console.print(f"[green]wrote[/] {escape(', '.join(map(str, written)))}", highlight=False, soft_wrap=True)


def _logit_diffs(specs: list[str]) -> list[tuple[str, str]]:
    """--logit-diff 'A|B' values as (A, B) pairs."""
    for spec in specs:
        if spec.count("|") != 1:
            raise typer.BadParameter(f"--logit-diff {spec!r}: write 'A|B', e.g. ' Austin| Dallas'")
    return [(a, b) for a, b in (spec.split("|") for spec in specs)]


def _prompt_before_loading(model: str, prompt: str) -> tuple[Any | None, Any | None]:
    """The prompt checked against the model before any weights load: its length against the model's context
    (from its config.json alone: in characters, then in tokens) and its words against the vocabulary, when the
    config and the tokenizer are on this machine (otherwise the same checks come right after loading). Returns
    the tokenizer and the prompt's token ids (None, None when the tokenizer is not here)."""
    from clt_hub.models.loading import check_prompt_text, context_length, encode_prompt
    from clt_hub.training.config import local_model_config

    config = local_model_config(model)
    context = context_length(config) if config is not None else None
    check_prompt_text(prompt, context)  # a prompt far longer than the context is never tokenised
    early = _tokenizer_before_loading(model)
    return early, (encode_prompt(early, prompt, context) if early is not None else None)


def _tokenizer_before_loading(model: str) -> Any | None:
    """The model's tokenizer alone, when it is on this machine (a folder, the Hub cache, a converted known model),
    so that words can be checked before any weights load; None otherwise (then they are checked after loading,
    before any work)."""
    from clt_hub.training.config import local_model

    source = local_model(model)
    if source is None:
        return None
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # not readable alone: the full load says what is wrong
        return None


def _writable_folder(path: Path) -> None:
    """Create `path` (a folder) or say in one line why it cannot hold the output."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; give a folder for the output")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a name of its own: ranks under torchrun probe the same folder at once, and a shared name let one rank
        # delete the other's probe before it did (FileNotFoundError, reported as "cannot be written")
        with tempfile.NamedTemporaryFile(dir=path, prefix=".clt_hub_write_test"):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {path} cannot be written ({exc.strerror or exc}); choose another folder") from None


def _parse_intervention(spec: str, kind: str) -> Any:
    import re

    from clt_hub.attribution.interventions import Intervention
    from clt_hub.errors import ConfigError

    m = re.fullmatch(r"(\d+):(\d+)(?:@(\d+))?=(-?[\d.eE+-]+)", spec.strip())
    if not m:
        raise ConfigError(f"cannot read --{kind} {spec!r}; write LAYER:FEATURE[@POS]=NUMBER, e.g. 3:1234@5=-2")
    try:
        number = float(m[4])
    except ValueError:  # the pattern admits "1.2.3" or "1e": say which part is wrong, not a traceback
        raise ConfigError(f"cannot read --{kind} {spec!r}: {m[4]!r} is not a number; write LAYER:FEATURE[@POS]=NUMBER, "
                          "e.g. 3:1234@5=-2") from None
    if number in (float("inf"), float("-inf")):  # "1e999": an infinite activation makes every logit NaN
        raise ConfigError(f"cannot read --{kind} {spec!r}: {m[4]!r} is too large (not a finite number)")
    if max(len(m[1]), len(m[2]), len(m[3] or "")) > 18:  # int() refuses more than 4,300 digits (a raw ValueError)
        raise ConfigError(f"cannot read --{kind} {spec!r}: layer, feature and position are at most 18 digits")
    layer, feature, pos = int(m[1]), int(m[2]), None if m[3] is None else int(m[3])
    return Intervention(layer, feature, pos, **({"value": number} if kind == "set" else {"scale": number}))


def _supernode_interventions(spec: str, kind: str, graph: Path | None) -> list:

    from clt_hub.attribution.supernodes import interventions_for
    from clt_hub.errors import ConfigError

    if graph is None:
        raise ConfigError("supernode interventions need --graph GRAPH.json (written by `clt-hub trace --supernodes`)")
    name, sep, number = spec.rpartition("=")
    try:
        amount = float(number)
    except ValueError:
        amount = float("nan")
    if not sep or not name or not math.isfinite(amount):
        raise ConfigError(f"cannot read supernode intervention {spec!r}; write NAME=NUMBER with a finite number, "
                          "e.g. 'Texas=-2'")
    from clt_hub.attribution.graph_json import load

    supernodes = load(graph).qparams.get("supernodes", [])
    return interventions_for(supernodes, name, **{kind: amount})


@app.command()
@friendly
def intervene(
    prompt: Annotated[str, typer.Argument(help="Text to run.")],
    model: Annotated[str, typer.Option("--model", help="transformers model id or local folder.")],
    transcoder: Annotated[str, typer.Option("--transcoder", help="Transcoder repo id, registry name or folder.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="LAYER:FEATURE\\[@POS]=VALUE (repeatable), e.g. 3:1234@5=0.")] = None,
    scale: Annotated[list[str] | None, typer.Option("--scale", help="LAYER:FEATURE\\[@POS]=FACTOR (repeatable), e.g. 3:1234@5=-2.")] = None,
    mode: Annotated[Mode, typer.Option(help="constrained (the graph's linear model) or open (replacement model).")] = Mode.constrained,
    live_attention: Annotated[bool, typer.Option("--live-attention", help="Open mode: recompute attention.")] = False,
    scale_supernode: Annotated[list[str] | None, typer.Option(
        "--scale-supernode", help="NAME=FACTOR: scale every member of a supernode of --graph (repeatable).")] = None,
    set_supernode: Annotated[list[str] | None, typer.Option(
        "--set-supernode", help="NAME=VALUE: set every member of a supernode of --graph (repeatable).")] = None,
    graph: Annotated[Path | None, typer.Option(
        "--graph", help="graph.json (from `clt-hub trace`) whose qParams.supernodes name the groups.")] = None,
    top: Annotated[int, typer.Option(min=1, help="How many top tokens to show.")] = 5,
    offline: Offline = False,
) -> None:
    """Set or scale transcoder features and show the top next tokens before and after."""
    from clt_hub.attribution.interventions import check_distinct, check_interventions
    from clt_hub.attribution.interventions import intervene as run
    from clt_hub.models.loading import (
        check_compatible,
        check_prompt_text,
        context_length,
        encode_prompt,
        load_model,
        load_transcoder,
    )

    check_prompt_text(prompt)
    ivs = [_parse_intervention(x, "set") for x in set_ or []] + [_parse_intervention(x, "scale") for x in scale or []]
    for specs, kind in ((scale_supernode or [], "scale"), (set_supernode or [], "value")):
        for spec in specs:
            ivs += _supernode_interventions(spec, kind, graph)
    if not ivs:
        raise typer.BadParameter("give at least one --set, --scale, --set-supernode or --scale-supernode")
    check_distinct(ivs)
    early, early_ids = _prompt_before_loading(model, prompt)
    n_tokens = None
    if early is not None and early_ids is not None:  # the prompt's positions and --top, before any weights load
        n_tokens = len(early_ids)
        _check_top(top, len(early))
    # the transcoder first, as `load` does: layers and features are checked against it before the model loads
    tc = load_transcoder(transcoder, local_files_only=offline)
    check_interventions(tc, ivs, n_tokens)
    lm, tok = load_model(model, local_files_only=offline)
    check_compatible(lm, tc)
    ids = encode_prompt(tok, prompt, context_length(lm))
    _check_top(top, int(lm.get_output_embeddings().weight.shape[0]))  # the logits' width
    result = run(lm, tc, ids, ivs, mode=mode.value, freeze_attention=not live_attention)  # type: ignore[arg-type]
    table = Table("rank", "before", "p", "after", "p", title=f"{mode.value} intervention")
    for i, ((t0, p0), (t1, p1)) in enumerate(zip(result.top_tokens(top, original=True), result.top_tokens(top), strict=True)):
        table.add_row(str(i + 1), repr(tok.decode([t0])), f"{p0:.3f}", repr(tok.decode([t1])), f"{p1:.3f}")
    console.print(table)


@app.command(name="feature")
@friendly
def feature_cmd(
    layer: Annotated[int, typer.Argument(min=0, help="The feature's layer.")],
    feature: Annotated[int, typer.Argument(min=0, help="The feature's index in that layer.")],
    model: Annotated[str, typer.Option("--model", help="transformers model id or local folder.")],
    transcoder: Annotated[str, typer.Option("--transcoder", help="Transcoder repo id, registry name or folder.")],
    k: Annotated[int, typer.Option("--k", min=1, help="Entries per list.")] = 10,
    head: Annotated[list[str] | None, typer.Option("--head", help="'LAYER.HEAD': also the upstream features through this attention head's OV circuit (repeatable).")] = None,
    texts: Annotated[str | None, typer.Option("--texts", help="Texts (.txt/.jsonl/folder/dataset name) for global weights (TWERA: virtual weights scaled by co-activation).")] = None,
    n_tokens: Annotated[int, typer.Option(min=1, help="Tokens of --texts to read.")] = 20_000,
    text_field: Annotated[str, typer.Option(help="Text column/field of --texts.")] = "text",
    out: Annotated[Path | None, typer.Option("--out", help="Also write everything shown as JSON here.")] = None,
    offline: Offline = False,
) -> None:
    """What a feature reads, by the weights alone: its de-embedding (tokens whose embeddings drive it), its
    strongest upstream features by virtual weight (decoder . encoder through the residual stream, or through an
    attention head's OV circuit) and, with --texts, its global weights over a text sample. No prompt needed."""
    from clt_hub.attribution.weights import feature_weights
    from clt_hub.models.loading import load
    from clt_hub.texts import check_source, iter_texts

    heads = [_layer_head(spec) for spec in head or []]
    if texts:
        check_source(texts, text_field=text_field, what="--texts", progress=True)
    if out is not None:
        _writable_folder(out.parent)
    with console.status("loading model and transcoder"):
        lm, tok, tc = load(model, transcoder, local_files_only=offline)
    report = feature_weights(lm, tok, tc, layer, feature, k=k, heads=heads, n_tokens=n_tokens, progress=True,
                             texts=iter_texts(texts, text_field=text_field) if texts else None)
    _print_feature_report(report)
    if out is not None:
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        console.print(f"[green]wrote[/] {escape(str(out))}", highlight=False)


def _layer_head(spec: str) -> tuple[int, int]:
    parts = spec.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise typer.BadParameter(f"--head {spec!r}: write LAYER.HEAD, e.g. 3.1")
    return int(parts[0]), int(parts[1])


def _print_feature_report(report: dict[str, Any]) -> None:
    """One table per list of `feature_weights`' report."""
    title = f"L{report['layer']}#{report['feature']}"
    de = report["de_embedding"]
    t = Table("token (drives it)", "weight", "token (against it)", "weight",
              title=f"{title}: de-embedding (direct path from the token embedding; norm scale {de['norm_scale']:.3g})",
              title_justify="left")
    for a, b in zip(de["top"], de["bottom"], strict=True):
        t.add_row(escape(repr(a["text"] if a["text"] is not None else a["token"])), f"{a['weight']:+.4g}",
                  escape(repr(b["text"] if b["text"] is not None else b["token"])), f"{b['weight']:+.4g}")
    console.print(t)
    lists = [("virtual weights (residual stream)", report["virtual_weights"])]
    lists += [(f"virtual weights through head {h['head']} of layer {h['attn_layer']}", h) for h in report["heads"]]
    if "global_weights" in report:
        g = report["global_weights"]
        lists.append((f"global weights (TWERA) over {g['tokens']:,} tokens, {g['active_tokens']:,} with the feature "
                      f"active, {g['seconds']:.1f} s", g["twera"]))
    for name, ranked in lists:
        t = Table("upstream (+)", "weight", "upstream (-)", "weight", title=f"{title}: {name}", title_justify="left")
        pos, neg = ranked["positive"], ranked["negative"]
        for i in range(max(len(pos), len(neg))):
            cells = [(f"L{u['layer']}#{u['feature']}", f"{u['weight']:+.4g}") if u else ("", "")
                     for u in (pos[i] if i < len(pos) else None, neg[i] if i < len(neg) else None)]
            t.add_row(*cells[0], *cells[1])
        console.print(t)


def _check_top(top: int, vocabulary: int) -> None:
    if top > vocabulary:
        raise typer.BadParameter(f"--top {top} is more tokens than the model's vocabulary has ({vocabulary:,})")


def _flag(cls: Any, name: str) -> Any:
    """A --flag for field `name` of a config dataclass, with the field's own help and default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    text = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING and f.default is not None:
        text += f" (default: {f.default})"
    return typer.Option(help=text, show_default=False)


@app.command()
@friendly
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML file with TrainConfig fields; flags below override it.")] = None,
    model: Annotated[str | None, _flag(TrainConfig, "model")] = None,
    dataset: Annotated[str | None, _flag(TrainConfig, "dataset")] = None,
    out_dir: Annotated[str | None, _flag(TrainConfig, "out_dir")] = None,
    kind: Annotated[str | None, _flag(Architecture, "kind")] = None,
    d_sae: Annotated[int | None, _flag(Architecture, "d_sae")] = None,
    activation: Annotated[str | None, _flag(Architecture, "activation")] = None,
    topk: Annotated[int | None, _flag(Architecture, "topk")] = None,
    n_tokens: Annotated[int | None, _flag(TrainConfig, "n_tokens")] = None,
    batch_size: Annotated[int | None, _flag(TrainConfig, "batch_size")] = None,
    lr: Annotated[float | None, _flag(TrainConfig, "lr")] = None,
    sparsity_coeff: Annotated[float | None, _flag(TrainConfig, "sparsity_coeff")] = None,
    cache_dir: Annotated[str | None, _flag(TrainConfig, "cache_dir")] = None,
    parallel: Annotated[str | None, _flag(TrainConfig, "parallel")] = None,
    push_to_hub: Annotated[str | None, _flag(TrainConfig, "push_to_hub")] = None,
    eval_dataset: Annotated[str | None, _flag(TrainConfig, "eval_dataset")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help=(
        "FIELD=VALUE for any other TrainConfig field, transcoder.FIELD=VALUE for the transcoder's "
        "(YAML value syntax), e.g. --set warmup_steps=50 --set transcoder.skip=true."))] = None,
    bad_records: Annotated[str | None, _flag(TrainConfig, "bad_records")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's last checkpoint.")] = False,
    allow_config_change: Annotated[bool, typer.Option("--allow-config-change", help=(
        "With --resume: continue a checkpoint even though training settings changed (the artifact then "
        "describes the new settings)."))] = False,
) -> None:
    """Train a transcoder on a model's MLP activations (run under torchrun for several processes)."""
    from clt_hub.distributed import init_distributed, rank_world
    from clt_hub.training.run import train as run

    cfg = TrainConfig.from_sources(config, {
        "model": model, "dataset": dataset, "out_dir": out_dir, "n_tokens": n_tokens, "batch_size": batch_size,
        "lr": lr, "sparsity_coeff": sparsity_coeff, "cache_dir": cache_dir, "parallel": parallel,
        "push_to_hub": push_to_hub, "eval_dataset": eval_dataset, "bad_records": bad_records,
        "transcoder.kind": kind, "transcoder.d_sae": d_sae, "transcoder.activation": activation,
        "transcoder.topk": topk,
    }, set_ or [])
    init_distributed()  # train() checks the device and the memory the transcoder needs before the model loads
    final = run(cfg, resume=resume, allow_config_change=allow_config_change)
    if rank_world()[0] == 0:
        console.print(f"[green]transcoder written to[/] {final}")


@app.command(name="eval")
@friendly
def eval_cmd(
    model: Annotated[str, typer.Argument(help="transformers model id or local folder.")],
    transcoder: Annotated[str, typer.Argument(help="Transcoder repo id, registry name or folder.")],
    dataset: Annotated[str, typer.Option(help="Held-out text: .txt/.jsonl file, folder or dataset name.")],
    n_tokens: Annotated[int, typer.Option(min=1, help="Evaluation tokens.")] = 20000,
    context_size: Annotated[int | None, typer.Option(min=2, help="Tokens per sequence (default: 128, or the model's "
                                                                 "context if shorter).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of the dataset.")] = "text",
    out: Annotated[Path | None, typer.Option(help="Folder for eval.json and layers.png.")] = None,
    write_metrics: Annotated[bool, typer.Option("--write-metrics", help="Store the metrics in the artifact (config + model card).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences of one length per forward pass (the metrics do not "
                                                 "depend on it; 1 uses the least memory).")] = 8,
    offline: Offline = False,
) -> None:
    """Evaluate a transcoder: per-layer FVU/L0/dead/dense, and CE recovered when it replaces every MLP."""
    from clt_hub.models.loading import context_length, load
    from clt_hub.texts import check_source
    from clt_hub.training.config import local_model_config
    from clt_hub.training.curves import plot_layers
    from clt_hub.training.evaluate import evaluate

    # every option before the model loads: an evaluation is minutes of work to lose
    if write_metrics and not Path(transcoder).is_dir():
        raise typer.BadParameter("--write-metrics needs a local transcoder folder")
    config = local_model_config(model)
    if config is not None:
        _eval_context(context_size, context_length(config))
    check_source(dataset, text_field=text_field, bad_records="skip", what="--dataset", progress=True)
    if out is not None:
        _writable_folder(out)
    lm, tok, tc = load(model, transcoder, local_files_only=offline)
    context_size = _eval_context(context_size, context_length(lm))
    report = evaluate(lm, tok, tc, dataset, n_tokens=n_tokens, context_size=context_size, text_field=text_field,
                      progress=True, batch_size=batch_size)
    table = Table("layer", "FVU", "NMSE", "L0", "dead", "dense", title=f"{report.n_tokens} tokens")
    for l in range(len(report.fvu)):
        table.add_row(str(l), f"{report.fvu[l]:.4f}", f"{report.nmse[l]:.4f}", f"{report.l0[l]:.1f}",
                      f"{report.dead_fraction[l]:.3f}", f"{report.dense_fraction[l]:.3f}")
    console.print(table)
    console.print(f"CE original {report.ce_original:.4f}, replaced {report.ce_replaced:.4f}, zero-ablated "
                  f"{report.ce_zero_ablated:.4f}: [bold]{report.ce_recovered:.1%} recovered[/]; next-token agreement "
                  f"{report.next_token_agreement:.3f}; KL {report.kl:.4f}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report.to_dict(), indent=1))
        plot_layers(report, out / "layers.png")
        console.print(f"[green]wrote[/] {out / 'eval.json'} and {out / 'layers.png'}")
    if write_metrics:
        folder = Path(transcoder)
        from clt_hub.artifacts.metrics import write_metrics as store_metrics

        # only clt_hub's own files change, in the folder's layout; never the weights or the user's files
        written = store_metrics(folder, report.summary())
        console.print(f"[green]metrics written into[/] {folder}: {', '.join(str(p.relative_to(folder)) for p in written)}")


def _eval_context(context_size: int | None, limit: int | None) -> int:
    """`--context-size`, refused when longer than the model's context `limit`; by default 128 or the context."""
    if context_size is None:
        return min(128, limit or 128)
    if limit is not None and context_size > limit:
        raise typer.BadParameter(f"--context-size {context_size:,} is longer than the model's context "
                                 f"({limit:,} tokens); use at most {limit:,}")
    return context_size


def main() -> None:
    app()


if __name__ == "__main__":
    main()
