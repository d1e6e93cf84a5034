"""circuit-tracer loads artifacts that clt_hub wrote, and computes the same numbers.

Run in circuit-tracer's own venv (`python3 -m nox -s peer`): circuit-tracer pins
transformers<=4.57, which clt_hub's main environment does not. Exits non-zero on any mismatch. The shapes are
tiny already (4 layers, d_model 32, 64 features), so `--smoke` runs the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from hubserver import FakeHub  # noqa: E402

HUB = FakeHub()
HUB.start()
os.environ.update({"HF_ENDPOINT": HUB.endpoint, "HF_HOME": tempfile.mkdtemp(), "HF_HUB_DISABLE_XET": "1",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "hf_local_test_token"})

import torch  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt  # noqa: E402
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set  # noqa: E402
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub  # noqa: E402
from helpers import random_transcoder  # noqa: E402

REL_TOL = 1e-6  # float32 sums in a different order (index_add vs matmul) differ in the last bits
rows: list[tuple[str, float, float, float]] = []


def compare(name: str, ours, theirs_encode, theirs_decode, x: torch.Tensor, skip_term=None) -> None:
    """x: [pos, n_layers, d]. circuit-tracer wants [n_layers, pos, d]."""
    with torch.no_grad():
        recon, acts = ours(x)
        if skip_term is not None:
            recon = recon - skip_term
        xt = x.transpose(0, 1).contiguous()
        their_acts = theirs_encode(xt)
        their_recon = theirs_decode(their_acts, xt)
    enc = (their_acts.to_dense() if their_acts.is_sparse else their_acts).transpose(0, 1) - acts
    dec = their_recon.transpose(0, 1) - recon
    rows.append((name, enc.abs().max().item(), dec.abs().max().item(),
                 dec.abs().max().item() / recon.abs().max().item()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same run: its shapes are tiny already")
    ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    x = torch.randn(12, 4, 32)

    for activation in ("jumprelu", "relu"):
        clt = random_transcoder("clt", activation, n_layers=4, d_model=32, d_sae=64, model_name="gpt2")
        clt.save_pretrained(tmp / f"clt-{activation}")
        for lazy in (False, True):
            theirs = load_clt(str(tmp / f"clt-{activation}"), scan="crosschecks", feature_input_hook="hook_resid_mid",
                              feature_output_hook="hook_mlp_out", lazy_decoder=lazy, device=torch.device("cpu"),
                              dtype=torch.float32)
            compare(f"CLT {activation}, load_clt(lazy_decoder={lazy})", clt, theirs.encode,
                    lambda a, xt, t=theirs: t.decode(a.to_sparse()), x)

    skip_clt = random_transcoder("clt", "jumprelu", skip=True, n_layers=4, d_model=32, d_sae=64, seed=3)
    skip_clt.save_pretrained(tmp / "clt-skip")
    theirs = load_clt(str(tmp / "clt-skip"), scan="crosschecks", feature_input_hook="hook_resid_mid",
                      feature_output_hook="hook_mlp_out", lazy_decoder=False, device=torch.device("cpu"),
                      dtype=torch.float32)
    skip_term = torch.stack([x[:, l] @ skip_clt.W_skip[l].T for l in range(4)], dim=1).detach()
    compare("CLT + skip (circuit-tracer drops W_skip; compared without it)", skip_clt, theirs.encode,
            lambda a, xt, t=theirs: t.decode(a.to_sparse()), x, skip_term=skip_term)

    # from the (fake) Hub with circuit-tracer's own loader and its own huggingface_hub
    HUB.add_folder("crosschecks/clt", tmp / "clt-jumprelu")
    clt = random_transcoder("clt", "jumprelu", n_layers=4, d_model=32, d_sae=64, model_name="gpt2")
    theirs, _ = load_transcoder_from_hub("crosschecks/clt", device=torch.device("cpu"), dtype=torch.float32, use_cache=False)
    compare("CLT via load_transcoder_from_hub('crosschecks/clt')", clt, theirs.encode,
            lambda a, xt, t=theirs: t.decode(a.to_sparse()), x)

    for skip in (False, True):
        plt = random_transcoder("plt", "jumprelu", skip=skip, n_layers=4, d_model=32, d_sae=64, seed=7)
        out = tmp / f"plt-{skip}"
        plt.save_pretrained(out, layout="circuit-tracer")
        theirs = load_transcoder_set({l: str(out / f"layer_{l}.safetensors") for l in range(4)}, scan="crosschecks",
                                     feature_input_hook="hook_resid_mid", feature_output_hook="hook_mlp_out",
                                     device=torch.device("cpu"), dtype=torch.float32,
                                     lazy_encoder=False, lazy_decoder=False)
        compare(f"PLT skip={skip}, transcoder_set layout", plt, theirs.encode,
                lambda a, xt, t=theirs: t.decode(a, xt), x)
    HUB.add_folder("crosschecks/plt", tmp / "plt-True")
    plt = random_transcoder("plt", "jumprelu", skip=True, n_layers=4, d_model=32, d_sae=64, seed=7)
    theirs, _ = load_transcoder_from_hub("crosschecks/plt", device=torch.device("cpu"), dtype=torch.float32, use_cache=False,
                                         lazy_encoder=False, lazy_decoder=False)
    compare("PLT skip via load_transcoder_from_hub('crosschecks/plt')", plt, theirs.encode,
            lambda a, xt, t=theirs: t.decode(a, xt), x)

    width = max(len(r[0]) for r in rows)
    print(f"{'artifact written by clt_hub, loaded by circuit-tracer':<{width}}  max|enc diff|  max|recon diff|  relative")
    for name, e, d, r in rows:
        print(f"{name:<{width}}  {e:12.3e}  {d:14.3e}  {r:9.2e}")
    bad = [r for r in rows if r[1] != 0 or r[3] > REL_TOL]
    print(f"FAILED: {len(bad)} row(s) off" if bad else
          f"OK: encodings identical, reconstructions within {REL_TOL:g} relative")
    HUB.stop()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
