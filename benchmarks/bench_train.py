"""Training throughput: tokens/s of a CLT training step on a GPT-2-small-shaped model, the share of
this machine's own dense matmul throughput it reaches (measured in the same run), where the time
goes, and a side-by-side with SAE-Lens's trainer for the per-layer case at equal width and batch.

    python benchmarks/bench_train.py [--features 1024] [--batch 512] [--steps 10] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def matmul_flops(n: int = 1536, repeats: int = 5) -> float:
    """Achieved FLOP/s of a dense float32 n x n x n matmul: the machine's reference throughput."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=1024, help="features per layer")
    ap.add_argument("--batch", type=int, default=512, help="tokens per step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--smoke", action="store_true", help="check the code path in seconds: 2 layers, d_model 32")
    args = ap.parse_args()
    import transformers as T

    from clt_hub.config import Architecture
    from clt_hub.models.hooks import mlp_io
    from clt_hub.training.config import TrainConfig
    from clt_hub.training.trainer import Trainer

    L, d, heads, F, B = args.layers, 768, 12, args.features, args.batch
    if args.smoke:
        L, d, heads, F, B, args.steps = 2, 32, 4, 64, 64, 1
    torch.manual_seed(0)
    peak = matmul_flops(256 if args.smoke else 1536)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; dense fp32 matmul: {peak / 1e9:.1f} GFLOP/s")

    # 1. activations from the model (GPT-2 small shape), tokens/s
    cfg = T.GPT2Config(n_layer=L, n_embd=d, n_head=heads, vocab_size=50257, n_positions=1024)
    cfg._attn_implementation = "eager"
    model = T.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50257, (4, 128))
    t_model = timed(lambda: mlp_io(model, ids), 2)
    x, y = mlp_io(model, ids)
    x, y = x.reshape(-1, L, d)[:B].float(), y.reshape(-1, L, d)[:B].float()
    print(f"model forward for activations: {ids.numel() / t_model:,.0f} tokens/s")

    # 2. CLT training step
    tcfg = TrainConfig(model="bench", dataset="bench", transcoder=Architecture(d_sae=F), n_tokens=10**9, batch_size=B,
                       preact_coeff=3e-6)
    tr = Trainer(tcfg, n_layers=L, d_model=d)
    tr.fit_scales(x, y)
    t_step = timed(lambda: tr.train_step(x, y), args.steps)
    dec_params = F * d * L * (L + 1) // 2
    enc_params = L * F * d
    step_flops = 3 * 2 * B * (enc_params + dec_params)  # forward + backward (2x) of encoder and decoders
    print(f"\nCLT {L} layers x {F} features: {dec_params / 1e6:.0f}M decoder + {enc_params / 1e6:.1f}M encoder params")
    print(f"training step: {t_step * 1e3:.0f} ms = {B / t_step:,.0f} tokens/s; {step_flops / t_step / 1e9:.1f} GFLOP/s "
          f"= {step_flops / t_step / peak:.0%} of dense matmul throughput")

    # where the time goes
    xn, yn = x * tr.scale_in[None, :, None], y * tr.scale_out[None, :, None]
    t_enc = timed(lambda: tr._encode(xn), args.steps)
    pre, acts = tr._encode(xn)
    t_dec = timed(lambda: tr.tc.decode(acts, dense=True), args.steps)

    def fwd_bwd() -> None:
        pre, acts = tr._encode(xn)
        loss = (tr.tc.decode(acts, dense=True) - yn).pow(2).sum(-1).mean() + torch.tanh(acts * tr.tc.decoder_norms()[None]).sum((-1, -2)).mean()
        tr.optimizer.zero_grad()
        loss.backward()

    t_fb = timed(fwd_bwd, args.steps)
    t_opt = timed(lambda: tr.optimizer.step(), args.steps)
    print(f"  encoder forward {t_enc * 1e3:.0f} ms, decoder forward {t_dec * 1e3:.0f} ms, "
          f"backward {max(0.0, t_fb - t_enc - t_dec) * 1e3:.0f} ms, optimiser {t_opt * 1e3:.0f} ms, "
          f"model forward for this batch {t_model * B / ids.numel() * 1e3:.0f} ms (once per token; cached runs skip it)")

    # 3. per-layer case vs SAE-Lens at equal width and batch
    one = Trainer(TrainConfig(model="bench", dataset="bench", transcoder=Architecture(kind="plt", d_sae=F),
                              n_tokens=10**9, batch_size=B, preact_coeff=3e-6), n_layers=1, d_model=d)
    layer = min(5, L - 1)
    x1, y1 = x[:, layer:layer + 1].contiguous(), y[:, layer:layer + 1].contiguous()
    one.fit_scales(x1, y1)
    t_ours = timed(lambda: one.train_step(x1, y1), args.steps)
    try:
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        print("\nSAE-Lens is not installed (pip install sae-lens): no side-by-side")
        return
    scfg = JumpReLUTrainingSAEConfig(d_in=d, d_sae=F, jumprelu_sparsity_loss_mode="tanh", l0_coefficient=1e-3,
                                     pre_act_loss_coefficient=3e-6, jumprelu_bandwidth=1.0)
    sae = JumpReLUTrainingSAE(scfg)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
    sae_in = x1[:, 0] * one.scale_in[0]

    def sae_step() -> None:
        out = sae.training_forward_pass(TrainStepInput(sae_in=sae_in, coefficients={"l0": 1e-3}, dead_neuron_mask=None,
                                                       n_training_steps=1, is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    t_sae = timed(sae_step, args.steps)
    print(f"\nper-layer step, d_in {d}, {F} features, batch {B} (JumpReLU, tanh sparsity, pre-act loss, Adam, clip):")
    print(f"  clt_hub PLT (1 layer) {t_ours * 1e3:7.1f} ms  {B / t_ours:10,.0f} tokens/s")
    print(f"  SAE-Lens JumpReLU SAE {t_sae * 1e3:7.1f} ms  {B / t_sae:10,.0f} tokens/s")
    print(f"  clt_hub / SAE-Lens time: {t_ours / t_sae:.2f}x")


if __name__ == "__main__":
    main()
