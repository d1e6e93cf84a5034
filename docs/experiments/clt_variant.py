"""Train another CLT on an organism's model: the build's own settings (organism.clt_config) with
named fields changed, for comparing dictionaries on one model.

    PYTHONPATH=. python docs/experiments/clt_variant.py OUT [--from DIR] [--couplets-only] FIELD=JSON ...

e.g. `OUT n_tokens=6000000`, `OUT sparsity_c=10.0`, `OUT skip=true`, `OUT kind='"plt"'`,
`OUT --couplets-only`. DIR (default: the bundled artifacts) holds model/; OUT gets a copy of it
and the new clt/, the layout `plan_direction.py OUT` and the checks' `load_artifacts` read. The
texts are the corpus the build writes (seed 0); with --couplets-only, only its couplets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from clt_hub import Transcoder
from clt_hub.models.loading import load_model
from clt_hub.training.run import train
from paper_cases import corpus, organism


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--from", dest="source", type=Path, default=organism.ARTIFACTS)
    ap.add_argument("--couplets-only", action="store_true")
    ap.add_argument("fields", nargs="*", help="TrainConfig field=JSON value")
    args = ap.parse_intermixed_args()  # OUT --couplets-only FIELD=... as well as OUT FIELD=... --couplets-only
    overrides = {k: json.loads(v) for k, v in (f.split("=", 1) for f in args.fields)}
    if not (args.out / "model").exists():
        shutil.copytree(args.source / "model", args.out / "model")
    texts = args.out / "texts"
    c = corpus.build(0)
    organism.write_texts(texts, c, [d for d in c.train if d.startswith("poem :")] if args.couplets_only else None)
    cfg = organism.clt_config(args.out / "model", texts, out_dir=str(args.out / "run"), **overrides)
    model, tok = load_model(str(args.out / "model"), local_files_only=True)
    shutil.rmtree(cfg.out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    tc = Transcoder.from_pretrained(train(cfg, model=model, tokenizer=tok))
    tc.save_pretrained(args.out / "clt")
    print(json.dumps({"overrides": overrides, "couplets_only": args.couplets_only,
                      "minutes": round((time.perf_counter() - t0) / 60, 2), **tc.cfg.metrics}))


if __name__ == "__main__":
    main()
