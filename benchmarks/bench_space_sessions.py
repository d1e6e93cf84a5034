"""The Space's memory under many sessions: `python app.py` on 127.0.0.1, then N users (one gradio client
each, so one browser session each) trace an organism prompt and keep their graph, as visitors who leave
their tab open do. Prints the server process's RSS idle and after every 10 sessions, with the Space's
session cap (the $CLT_SPACE_MAX_SESSIONS / $CLT_SPACE_MAX_SESSION_MEMORY_MB defaults, or those given) and
without it, then asks the first user's session for something: dropped with the cap, still there without.

    python benchmarks/bench_space_sessions.py [--sessions 100] [--no-contexts] [--only cap|nocap] [--smoke]

Timings are not the point (about 2 s per trace on 2 CPU cores); memory is. docs/benchmarks.md has the
figures ("Space memory under many sessions").
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clt_hub.attribution.options import TraceOptions  # noqa: E402  the page's defaults (light: no torch)

PROMPTS = ["fact : the capital of the state containing Dallas is", "calc : 3 6 + 5 9 =",
           "poem : he saw a carrot and a habit \n", "fact : the bird of the state containing Tampa is",
           "fact : the capital of the state containing Miami is", "calc : 1 2 + 3 4 ="]
NO_CAP = {"CLT_SPACE_MAX_SESSIONS": "1000000", "CLT_SPACE_MAX_SESSION_MEMORY_MB": "1000000",
          "CLT_SPACE_MAX_BROWSER_SESSIONS": "10000"}  # gradio's own default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(label: str, extra_env: dict[str, str], n: int, contexts: bool) -> dict[str, object]:
    from bench_space_barrage import server
    from gradio_client import Client

    with server(extra_env) as srv:
        proc, url = srv.proc, srv.url
        time.sleep(2)
        idle = _rss_mib(proc.pid)
        print(f"[{label}] idle (organism loaded): {idle:.0f} MiB", flush=True)
        clients, peak, t0 = [], idle, time.perf_counter()
        for i in range(n):
            client = Client(url, verbose=False)
            client.predict(PROMPTS[i % len(PROMPTS)], "organism (bundled)", "", "",
                           TraceOptions.node_threshold, TraceOptions.edge_threshold, 4096, contexts,
                           api_name="/do_trace")
            clients.append(client)  # the user keeps the tab (and so the session) open
            rss = _rss_mib(proc.pid)
            peak = max(peak, rss)
            if (i + 1) % 10 == 0:
                print(f"[{label}] {i + 1:4d} sessions: {rss:6.0f} MiB ({time.perf_counter() - t0:.0f} s)", flush=True)
        after = _rss_mib(proc.pid)
        try:  # the first user comes back: group the graph's features
            clients[0].predict(api_name="/do_accept")
            first = "still there"
        except Exception as exc:  # noqa: BLE001 - gradio_client's AppError carries the message shown to users
            first = f"told: {exc}"
        newest = clients[-1].predict(api_name="/do_accept")
        print(f"[{label}] first user's session: {first}", flush=True)
        return {"label": label, "idle": idle, "after": after, "peak": peak, "first": first,
                "newest_ok": bool(newest), "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--no-contexts", action="store_true", help="untick 'Top activating contexts' (faster)")
    parser.add_argument("--only", choices=["cap", "nocap"])
    parser.add_argument("--smoke", action="store_true", help="check the code path quickly: 2 sessions without "
                        "contexts, and a cap of 1 graph so that the first user's session is dropped")
    args = parser.parse_args()
    if args.smoke:
        args.sessions, args.no_contexts = 2, True
        os.environ["CLT_SPACE_MAX_SESSIONS"] = "1"  # read by Limits.from_env below and by app.py
    from space.config import Limits

    lim = Limits.from_env()
    runs = []
    if args.only != "nocap":
        label = f"cap {lim.max_sessions} graphs / {lim.max_session_memory_mb} MB"
        runs.append(run(label, {}, args.sessions, not args.no_contexts))
    if args.only != "cap":
        runs.append(run("no cap", NO_CAP, args.sessions, not args.no_contexts))
    print(f"\n{lim.max_browser_sessions} browser sessions kept by gradio, top activating contexts "
          f"{'off' if args.no_contexts else 'on'}")
    print(f"| {args.sessions} sessions | idle RSS (MiB) | RSS after (MiB) | peak (MiB) | first user's session |")
    print("|---|---:|---:|---:|---|")
    for r in runs:
        print(f"| {r['label']} | {r['idle']:.0f} | {r['after']:.0f} | {r['peak']:.0f} | {r['first']} |")


if __name__ == "__main__":
    main()
