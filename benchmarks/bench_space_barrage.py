"""The Space under a barrage (issue 37): `python app.py` on 127.0.0.1 with its default limits, then every
hostile request its page's inputs allow, each from its own anonymous gradio client (or, for what
gradio_client cannot send, a raw HTTP request to the same queue, as any visitor's script can), then 20
visitors tracing at once. For each hostile request: the first line of the message the visitor got, whether
it names the problem, and whether the server still answers; for the concurrent traces: that each got a
graph. The server's RSS (VmRSS) is sampled every 0.1 s in a background thread: idle, peak during the
barrage, after; and its VmHWM at the end.

    python benchmarks/bench_space_barrage.py [--traces 20] [--no-contexts] [--smoke]

`--smoke` sends the same hostile requests and 4 concurrent traces without contexts (about half a minute).
Every cache and scratch folder (HOME, XDG_*, CLT_HUB_CACHE, HF_HOME, GRADIO_TEMP_DIR, MPLCONFIGDIR, TMPDIR)
lives in a temporary folder that is removed at the end; the Hub is never reached (HF_HUB_OFFLINE=1, the
bundled organism). docs/benchmarks.md has the figures ("The Space under a barrage").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clt_hub.attribution.options import TraceOptions  # noqa: E402  the page's defaults (light: no torch)

ORGANISM = "organism (bundled)"  # space.config.ORGANISM, the page's default pick
CUSTOM = "other: Hub repo id or folder"  # space.config.CUSTOM
# space.config.ORGANISM_PROMPTS and the other organism prompts of bench_space_sessions.py
PROMPTS = ["fact : the capital of the state containing Dallas is", "calc : 3 6 + 5 9 =",
           "poem : he saw a carrot and a habit \n", "fact : the bird of the state containing Tampa is",
           "fact : the capital of the state containing Miami is", "calc : 1 2 + 3 4 ="]
MB = 1_000_000
RETENTION_VISITORS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status_kib(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


class RssSampler:
    """The server's VmRSS every `every` seconds in a background thread; `peak` is the largest seen (MiB)."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc_status_kib(self.pid, "VmRSS") / 1024)
                self.samples += 1
            except (OSError, RuntimeError):  # the process is gone (or a zombie without VmRSS)
                return
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        return proc_status_kib(self.proc.pid, "VmRSS") / 1024

    def hwm_mib(self) -> float:
        return proc_status_kib(self.proc.pid, "VmHWM") / 1024

    def answers(self) -> bool:
        """The server is up and serves its page."""
        if not self.alive:
            return False
        try:
            with urllib.request.urlopen(self.url, timeout=30) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


@contextmanager
def server(extra_env: dict[str, str] | None = None, folder: Path | None = None) -> Iterator[Server]:
    """`python app.py` as a Space operator runs it (default limits, organism preloaded), offline, with every
    cache in `folder` (a fresh temporary folder, removed afterwards, when not given)."""
    own = folder is None
    tmp = Path(tempfile.mkdtemp(prefix="bench-barrage-")) if folder is None else folder
    home = tmp / "home"
    port = free_port()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "CLT_HUB_CACHE": str(home / "clt_hub"), "HF_HOME": str(home / "hf"),
           "GRADIO_TEMP_DIR": str(tmp / "gradio"), "MPLCONFIGDIR": str(home / "mpl"), "TMPDIR": str(tmp),
           "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "CLT_SPACE_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    log = tmp / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(proc, url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if own:
            shutil.rmtree(tmp, ignore_errors=True)


# -- calling the Space ------------------------------------------------------------------------------------
def client(url: str) -> Any:
    """A new anonymous visitor: one gradio client, so one browser session (its own gr.State)."""
    from gradio_client import Client

    return Client(url, verbose=False)


def raw_call(c: Any, api_name: str, data: list[Any], event_data: Any = None, timeout: float = 120) -> Any:
    """What gradio_client cannot send (NaN and infinities in the JSON, a click's event data), sent as a
    visitor's own script would: a POST to the Space's queue in `c`'s browser session, then its event stream.
    `data` is every input of the event, a gr.State's slot included (None: the server fills in the session's
    value, as for the page). Returns the output data, or raises RuntimeError with the message a visitor is shown."""
    import httpx

    fn_index = c._infer_fn_index(api_name, None)  # noqa: SLF001 - the endpoint's index, as the page sends it
    dep = next(d for d in c.config["dependencies"] if d.get("id", -1) == fn_index)
    trigger = dep["targets"][0][0] if dep.get("targets") else None
    body = json.dumps({"data": data, "event_data": event_data, "fn_index": fn_index, "trigger_id": trigger,
                       "session_hash": c.session_hash}, allow_nan=True)  # Python's json reads NaN; so does gradio
    base = c.src.rstrip("/") + "/gradio_api/queue/"
    with httpx.Client(timeout=timeout) as http:
        joined = http.post(base + "join", content=body, headers={"Content-Type": "application/json"})
        if joined.status_code != 200:
            raise RuntimeError(f"HTTP {joined.status_code}: {joined.text}")
        event_id = joined.json()["event_id"]
        with http.stream("GET", base + "data", params={"session_hash": c.session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event_id or msg.get("msg") != "process_completed":
                    continue
                if msg.get("success"):
                    return msg["output"]["data"]
                out = msg.get("output") or {}
                raise RuntimeError(out.get("error") or "the server gave no message")
    raise RuntimeError("the event stream ended without a result")


def trace_args(prompt: str, contexts: bool = True, pick: str = ORGANISM, model: str = "", transcoder: str = "",
               node: Any = TraceOptions.node_threshold, edge: Any = TraceOptions.edge_threshold,
               max_nodes: Any = 4096) -> list[Any]:
    """do_trace's inputs as the page sends them (its defaults unless given)."""
    return [prompt, pick, model, transcoder, node, edge, max_nodes, contexts]


def traced_client(url: str, prompt: str = PROMPTS[1]) -> tuple[Any, list[Any]]:
    """A visitor who traced an organism prompt: the client and do_trace's outputs (for the pickers' choices)."""
    c = client(url)
    return c, list(c.predict(*trace_args(prompt, contexts=False), api_name="/do_trace"))


def choices(update: Any) -> list[str]:
    """The values a picker offers after a gr.update(choices=...)."""
    return [v for _, v in update["choices"]]


def is_graph(outputs: Any) -> bool:
    """do_trace's outputs hold a drawn graph (the SVG with its nodes) and the scores."""
    return ("<svg" in outputs[0] and 'data-node="' in outputs[0]
            and "Replacement score" in outputs[5])


# -- the hostile requests ---------------------------------------------------------------------------------
@dataclass
class Probe:
    """One hostile request: `send(url)` makes it (from a new visitor) and returns what the server answered
    (an outcome with no error is a failure); `expect` is a regex the visitor's message must match: the
    words that name the problem."""

    name: str
    send: Callable[[str], Any]
    expect: str


@dataclass
class Outcome:
    name: str
    refused: bool                 # the visitor got an error, not a result
    message: str                  # the whole message (or what came back instead)
    names_problem: bool           # the message matches the probe's `expect`
    alive_after: bool             # the server still served its page afterwards
    seconds: float
    rss_after: float              # server VmRSS right after (MiB)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.refused and self.names_problem and self.alive_after

    @property
    def first_line(self) -> str:
        line = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return line if len(line) <= 150 else f"{line[:140]}… ({len(line):,} characters)"


def _predict(api_name: str, *args: Any) -> Callable[[str], Any]:
    return lambda url: client(url).predict(*args, api_name=api_name)


_TRACED: dict[str, tuple[Any, list[Any]]] = {}


def _on_trace(call: Callable[[Any, list[Any]], Any]) -> Callable[[str], Any]:
    """A request made by the visitor who traced an organism prompt (so a graph is in their session): one such
    visitor for all of them, as one person trying everything on their graph."""
    def send(url: str) -> Any:
        if url not in _TRACED:
            _TRACED[url] = traced_client(url)
        return call(*_TRACED[url])
    return send


def _raise_unless_all_refused(messages: list[str]) -> Any:
    if "accepted" in messages:
        return messages
    raise RuntimeError("\n".join(dict.fromkeys(messages)))  # each distinct message once, in order


def _three_supernode_names(c: Any, outputs: list[Any]) -> Any:
    """Issue 37's crash: three 1 MB supernode names on one trace (refused before gradio reads them), then three
    of 100,000 characters (under the request cap: refused by the Space's own check), then three at the name cap
    (200 characters): accepted, and the collapsed graph is drawn with them."""
    kept = choices(outputs[8])
    messages = []
    for size in (MB, 100_000):
        for k in range(3):
            try:
                c.predict(chr(ord("a") + k) * size, kept[2 * k: 2 * k + 2], api_name="/do_add")
                messages.append("accepted")
            except Exception as exc:  # noqa: BLE001 - the message a visitor is shown
                messages.append(str(exc))
    for k in range(3):  # at the cap: allowed, and drawn
        out = c.predict(chr(ord("A") + k) * 200, kept[2 * k: 2 * k + 2], api_name="/do_add")
    if out[1].count('data-node="supernode:') != 3:
        messages.append("accepted")  # wrongly: the collapsed graph does not show the three supernodes at the cap
    return _raise_unless_all_refused(messages)


def _chunked_prompt(url: str) -> Any:
    """A 10 MB prompt sent in chunks, with no Content-Length: the cap counts what arrives."""
    c = client(url)
    body = json.dumps({"data": trace_args("x" * 10 * MB), "fn_index": c._infer_fn_index("/do_trace", None),  # noqa: SLF001
                       "session_hash": c.session_hash}).encode()
    import httpx

    chunks = (body[i: i + 65536] for i in range(0, len(body), 65536))
    answer = httpx.post(c.src.rstrip("/") + "/gradio_api/queue/join", content=chunks,
                        headers={"Content-Type": "application/json"}, timeout=60)
    if answer.status_code != 200:
        raise RuntimeError(f"HTTP {answer.status_code}: {answer.text}")
    return answer.text


def probes() -> list[Probe]:
    """Every text or number a visitor can send to the Space's API (app.py's inputs), made hostile. The issue's
    sizes (10 MB, 1 MB) are over the Space's request cap ($CLT_SPACE_MAX_REQUEST_KB, 256 KiB), so they are
    refused before gradio reads them (HTTP 413); 100,000-character values are under it, so they reach gradio's
    own checks (a picker's choices, a slider's range) and the Space's (prompt, name and node id caps)."""
    long_prompt = " ".join(["fact : the capital of the state containing Dallas is"] * 30)  # < 2,000 characters
    big = 100_000
    over_cap = r"is [\d,]+ characters long; this Space takes at most 200 \(\$CLT_SPACE_MAX_NAME_CHARS\)"
    not_choice = r"is not in the list of choices"
    too_large = r"413"  # gradio_client shows the status line ("413 Request Entity Too Large"), raw calls the text
    huge_text = r"413.*this request is (over )?[\d,]+ bytes; this Space takes at most 262,144 \(\$CLT_SPACE_MAX_REQUEST_KB\)"
    iv = "/do_intervene"
    return [
        # do_trace: the prompt
        Probe("prompt of 10 MB", _predict("/do_trace", *trace_args("x" * 10 * MB)), too_large),
        Probe("prompt of 10 MB, chunked (no Content-Length)", _chunked_prompt, huge_text),
        Probe("prompt of 100,000 characters", _predict("/do_trace", *trace_args("x" * big)),
              r"the prompt is 100,000 characters long; this Space takes at most 2,000 "
              r"\(\$CLT_SPACE_MAX_PROMPT_CHARS\)"),
        Probe(f"prompt of {len(long_prompt):,} characters, over 64 tokens",
              _predict("/do_trace", *trace_args(long_prompt)),
              r"the prompt is \d+ tokens long; this Space traces at most 64 \(\$CLT_SPACE_MAX_PROMPT_TOKENS\)"),
        Probe("prompt of blanks", _predict("/do_trace", *trace_args(" \n\t " * 100)), r"the prompt is empty"),
        # do_trace: model, transcoder and the picker
        Probe("model name of 300 characters",
              _predict("/do_trace", *trace_args(PROMPTS[0], pick=CUSTOM, model="m" * 300, transcoder="org/clt")),
              r"the model name " + over_cap),
        Probe("transcoder name of 1 MB",
              _predict("/do_trace", *trace_args(PROMPTS[0], pick=CUSTOM, model="org/model", transcoder="t" * MB)),
              too_large),
        Probe("transcoder name of 100,000 characters",
              _predict("/do_trace", *trace_args(PROMPTS[0], pick=CUSTOM, model="org/model", transcoder="t" * big)),
              r"the transcoder name " + over_cap),
        Probe("model: a server folder (/etc)",
              _predict("/do_trace", *trace_args(PROMPTS[0], pick=CUSTOM, model="/etc", transcoder="org/clt")),
              r"'/etc' is a path on the server; this Space reads no folders"),
        Probe("model: an odd repo id (`a b/c?d`), Hub unreachable",
              _predict("/do_trace", *trace_args(PROMPTS[0], pick=CUSTOM, model="a b/c?d", transcoder="org/clt")),
              r"is not in the local cache and the Hub .* cannot be reached or offline mode is on"),
        Probe("picker: 100,000 characters instead of a listed pair",
              _predict("/do_trace", *trace_args(PROMPTS[0], pick="p" * big)), not_choice),
        # do_trace: thresholds and the node budget
        Probe("node threshold 'abc'", _predict("/do_trace", *trace_args(PROMPTS[0], node="abc")),
              r"Node threshold \(influence kept\): give a number from 0.1 to 1, not 'abc'"),
        Probe("node threshold 100,000 characters", _predict("/do_trace", *trace_args(PROMPTS[0], node="9" * big)),
              r"Node threshold \(influence kept\): give a number from 0.1 to 1, not a str$"),
        Probe("edge threshold NaN (raw JSON)",
              lambda url: raw_call(client(url), "/do_trace", trace_args(PROMPTS[0], edge=math.nan)),
              r"Edge threshold \(influence kept\): give a number from 0.1 to 1, not nan"),
        Probe("edge threshold -1", _predict("/do_trace", *trace_args(PROMPTS[0], edge=-1)),
              r"Value -1 is less than minimum value 0.1"),
        Probe("max feature nodes 1e300", _predict("/do_trace", *trace_args(PROMPTS[0], max_nodes=1e300)),
              r"greater than maximum value 4096"),
        Probe("max feature nodes NaN (raw JSON)",
              lambda url: raw_call(client(url), "/do_trace", trace_args(PROMPTS[0], max_nodes=math.nan)),
              r"Max feature nodes: give a number from 16 to 4096, not nan"),
        # the Group tab
        Probe("three supernode names of 1 MB, then of 100,000 characters, on one trace",
              _on_trace(_three_supernode_names),
              r"(?s)(?=.*413)(?=.*the supernode name is 100,000 characters long; this Space takes at most 200)"),
        Probe("group: 100,000 characters instead of a feature",
              _on_trace(lambda c, o: c.predict("ok", ["z" * big], api_name="/do_add")), not_choice),
        Probe("remove: a supernode name of 100,000 characters",
              _on_trace(lambda c, o: c.predict("r" * big, api_name="/do_remove")), not_choice),
        # node details: the picker and a click's event data (the node id the page's script sends)
        Probe("node picker: 100,000 characters",
              _on_trace(lambda c, o: c.predict("n" * big, api_name="/on_node_pick")), not_choice),
        Probe("graph click: a node id of 100,000 characters",
              _on_trace(lambda c, o: raw_call(c, "/on_graph_click", [None], {"node": "n" * big})),
              r"the node id is 100,000 characters long; this Space takes at most 210"),
        Probe("graph click: a node id of 1 MB",
              _on_trace(lambda c, o: raw_call(c, "/on_graph_click", [None], {"node": "n" * MB})), huge_text),
        Probe("graph click: a node id that is a number",
              _on_trace(lambda c, o: raw_call(c, "/on_graph_click", [None], {"node": 12345})),
              r"a node id is text, not int"),
        Probe("group-graph click: a supernode id of 100,000 characters",
              _on_trace(lambda c, o: raw_call(c, "/on_group_click", [None, []], {"node": "supernode:" + "s" * big})),
              r"the node id is 100,010 characters long; this Space takes at most 210"),
        # the Intervene tab
        Probe("intervene: by 'abc'",
              _on_trace(lambda c, o: c.predict(choices(o[9])[:1], [], "multiply", "abc", "constrained", 8,
                                               api_name=iv)), r"give a finite number to set or multiply by"),
        Probe("intervene: by a number of 100,000 digits",
              _on_trace(lambda c, o: c.predict(choices(o[9])[:1], [], "multiply", "9" * big, "constrained", 8,
                                               api_name=iv)), r"give a finite number to set or multiply by"),
        Probe("intervene: set to Infinity (raw JSON)",
              _on_trace(lambda c, o: raw_call(c, iv, [None, choices(o[9])[:1], [], "set", math.inf, "open", 8])),
              r"give a finite number to set or multiply by"),
        Probe("intervene: set to 1e308",
              _on_trace(lambda c, o: c.predict(choices(o[9])[:1], [], "set", 1e308, "open", 32, api_name=iv)),
              r"1e\+308 is too large for this transcoder's float32 numbers \(at most 3.4e\+38\)"),
        Probe("intervene: 'how' of 100,000 characters",
              _on_trace(lambda c, o: c.predict(choices(o[9])[:1], [], "h" * big, 2.0, "constrained", 8,
                                               api_name=iv)), not_choice),
        Probe("intervene: 1e18 continuation tokens",
              _on_trace(lambda c, o: c.predict(choices(o[9])[:1], [], "multiply", 2.0, "constrained", 1e18,
                                               api_name=iv)), r"greater than maximum value 32"),
        # case studies and transcoder info
        Probe("case study: a case name of 100,000 characters",
              _predict("/do_case", ORGANISM, "", "", "c" * big, 2), not_choice),
        Probe("case study: 1e18 prompt variants", _predict("/do_case", ORGANISM, "", "", "addition", 1e18),
              r"greater than maximum value 6"),
        Probe("info: a 300-character model name", _predict("/do_info", CUSTOM, "m" * 300, "org/clt"),
              r"the model name " + over_cap),
        Probe("info: 1 MB instead of a listed pair", _predict("/do_info", "i" * MB, "", ""), too_large),
    ]


def send_probe(srv: Server, probe: Probe) -> Outcome:
    t0 = time.perf_counter()
    try:
        answer = probe.send(srv.url)
        refused, message = False, f"no error: {str(answer)[:300]}"
    except Exception as exc:  # noqa: BLE001 - AppError (gradio's message to the visitor) or RuntimeError (raw)
        refused, message = True, str(exc)
    seconds = time.perf_counter() - t0
    alive = srv.answers()
    return Outcome(probe.name, refused, message, bool(re.search(probe.expect, message)), alive, seconds,
                   srv.rss_mib() if alive else float("nan"))


# -- what gradio keeps of refused requests ------------------------------------------------------------------
def retention(srv: Server, visitors: int, size: int = 10 * MB) -> tuple[float, float]:
    """`visitors` new visitors each send one prompt of `size` characters (all refused): the server's RSS before
    and after (MiB). gradio keeps each browser session's last input values, the refused prompt included, unless
    the request is refused before gradio reads it."""
    before = srv.rss_mib()
    for _ in range(visitors):
        with contextlib.suppress(Exception):  # refused, as every one must be (checked among the probes)
            client(srv.url).predict(*trace_args("x" * size), api_name="/do_trace")
    time.sleep(1)
    return before, srv.rss_mib()


# -- concurrent traces ----------------------------------------------------------------------------------------
@dataclass
class TraceOutcome:
    prompt: str
    graph: bool
    seconds: float
    error: str = ""


def concurrent_traces(url: str, n: int, contexts: bool) -> list[TraceOutcome]:
    """`n` visitors press Trace at the same moment (one client each, in threads), on the organism's prompts."""
    clients = [client(url) for _ in range(n)]  # connected first, so the traces start together
    start = threading.Barrier(n)

    def one(k: int) -> TraceOutcome:
        prompt = PROMPTS[k % len(PROMPTS)]
        start.wait()
        t0 = time.perf_counter()
        try:
            out = clients[k].predict(*trace_args(prompt, contexts=contexts), api_name="/do_trace")
            return TraceOutcome(prompt, is_graph(out), time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            return TraceOutcome(prompt, False, time.perf_counter() - t0, str(exc).splitlines()[0][:200])

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


# -- the whole barrage ------------------------------------------------------------------------------------
@dataclass
class Report:
    idle: float
    hwm_idle: float
    outcomes: list[Outcome]
    traces: list[TraceOutcome]
    peak: float = 0.0
    after: float = 0.0
    hwm_end: float = 0.0
    alive_end: bool = False
    samples: int = 0
    hostile_seconds: float = 0.0
    traces_seconds: float = 0.0
    peak_hostile: float = 0.0
    retained: tuple[float, float] = (0.0, 0.0)  # RSS before and after 20 visitors' 10 MB prompts


def barrage(srv: Server, n_traces: int, contexts: bool, log: Callable[[str], None] = print) -> Report:
    """Every hostile request, one after another, then `n_traces` concurrent traces, while sampling RSS."""
    time.sleep(2)  # let the preloaded organism settle
    report = Report(srv.rss_mib(), srv.hwm_mib(), [], [])
    log(f"idle: {report.idle:.0f} MiB (VmHWM {report.hwm_idle:.0f} MiB)")
    with RssSampler(srv.proc.pid) as rss:
        t0 = time.perf_counter()
        for probe in probes():
            outcome = send_probe(srv, probe)
            report.outcomes.append(outcome)
            log(f"{'ok ' if outcome.ok else 'BAD'} {probe.name}: {outcome.first_line} ({outcome.seconds:.1f} s, "
                f"{outcome.rss_after:.0f} MiB)")
            if not outcome.alive_after:
                log("the server is down; stopping the barrage")
                break
        report.hostile_seconds = time.perf_counter() - t0
        if srv.alive:
            report.retained = retention(srv, RETENTION_VISITORS)
            log(f"{RETENTION_VISITORS} visitors' 10 MB prompts: {report.retained[0]:.0f} -> "
                f"{report.retained[1]:.0f} MiB")
        report.peak_hostile = rss.peak
        if srv.alive:
            t0 = time.perf_counter()
            report.traces = concurrent_traces(srv.url, n_traces, contexts)
            report.traces_seconds = time.perf_counter() - t0
            log(f"{n_traces} concurrent traces: {sum(t.graph for t in report.traces)} graphs in "
                f"{report.traces_seconds:.1f} s")
        time.sleep(1)
    report.alive_end = srv.answers()
    report.peak, report.samples = rss.peak, rss.samples
    if srv.alive:
        report.after, report.hwm_end = srv.rss_mib(), srv.hwm_mib()
        report.peak = max(report.peak, report.after)
    return report


def table(report: Report, n_traces: int, contexts: bool) -> str:
    rows = ["| request | refused, naming the problem | server answers after | s | RSS after (MiB) | "
            "first line of the message |", "|---|---|---|---:|---:|---|"]
    for o in report.outcomes:
        rows.append(f"| {o.name} | {'yes' if o.refused and o.names_problem else 'NO'} | "
                    f"{'yes' if o.alive_after else 'NO'} | {o.seconds:.1f} | {o.rss_after:.0f} | "
                    f"{o.first_line.replace('|', '¦')} |")
    graphs = sum(t.graph for t in report.traces)
    times = sorted(t.seconds for t in report.traces) or [0.0]
    errors = sorted({t.error for t in report.traces if t.error})
    rows += ["", "| server | value |", "|---|---:|",
             f"| alive at the end | {'yes' if report.alive_end else 'NO'} |",
             f"| hostile requests refused, naming the problem | {sum(o.ok for o in report.outcomes)} of "
             f"{len(report.outcomes)} |",
             f"| concurrent traces (contexts {'on' if contexts else 'off'}) returning a graph | {graphs} of {n_traces} |",
             f"| idle RSS (organism loaded), MiB | {report.idle:.0f} |",
             f"| {RETENTION_VISITORS} more visitors send a 10 MB prompt each: RSS before -> after, MiB | "
             f"{report.retained[0]:.0f} -> {report.retained[1]:.0f} |",
             f"| peak RSS during the hostile requests, MiB | {report.peak_hostile:.0f} |",
             f"| peak RSS during the whole barrage (VmRSS every 0.1 s), MiB | {report.peak:.0f} |",
             f"| RSS after, MiB | {report.after:.0f} |",
             f"| VmHWM idle -> end, MiB | {report.hwm_idle:.0f} -> {report.hwm_end:.0f} |",
             f"| hostile requests, wall s | {report.hostile_seconds:.1f} |",
             f"| {n_traces} concurrent traces, wall s (fastest / slowest visitor) | {report.traces_seconds:.1f} "
             f"({times[0]:.1f} / {times[-1]:.1f}) |"]
    if errors:
        rows.append(f"| trace errors | {'; '.join(errors)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=20, help="visitors tracing at once (default 20)")
    parser.add_argument("--no-contexts", action="store_true", help="untick 'Top activating contexts' (faster)")
    parser.add_argument("--smoke", action="store_true", help="the same hostile requests, 4 traces without contexts")
    args = parser.parse_args()
    if args.smoke:
        args.traces, args.no_contexts = 4, True
    contexts = not args.no_contexts
    t0 = time.perf_counter()
    with server() as srv:
        report = barrage(srv, args.traces, contexts)
    print(f"\nthe Space's default limits, {args.traces} concurrent traces, {time.perf_counter() - t0:.0f} s in all "
          f"(server start included)\n")
    print(table(report, args.traces, contexts))
    failed = [o.name for o in report.outcomes if not o.ok] + (["concurrent traces"] if not all(
        t.graph for t in report.traces) or len(report.traces) != args.traces else [])
    if failed or not report.alive_end:
        raise SystemExit(f"\nFAILED: {', '.join(failed) or 'the server died'}")


if __name__ == "__main__":
    main()
