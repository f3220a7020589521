"""
The training-step cost of the three head losses side by side in one process (docs/consistency.md):
TrigFlow, sCT (two JVPs) and LSD (one JVP, on 1 head row in 4, and on every row), on the toy LM
(calm.TOY, a batch of 32 windows of 64 frames) and on the head trained alone as in the PF-ODE map
test (mixture.train_head_alone: width 64, 2 blocks, batch 512). A step is forward, backward and an
AdamW step. The losses are interleaved within each round and every round also times an fp32
matmul, so a shared machine slows them alike and the GFLOP/s says how fast this CPU was.

    python -m bench.heads --threads 1 --rounds 7

Prints, per setting, the median seconds per step over the rounds and its ratio to TrigFlow's.
"""
import argparse
import statistics
import time
from dataclasses import replace

import torch

import calm
import mixture
from bench.profile import matmul_rate

# name: calm.Config fields, and the step the loss is computed at (sCT: after the TrigFlow phase)
HEADS = {'TrigFlow': ({'head_loss': 'trigflow'}, 0),
         'sCT': ({'head_loss': 'consistency'}, 10 ** 6),
         'LSD': ({'head_loss': 'lsd'}, 0),
         'LSD, every row': ({'head_loss': 'lsd', 'lsd_frac': 1.0}, 0)}


def lm_jobs():
    """The toy LM, one model per head loss, on the toy's batch (no text: its cost is nil)."""
    x = torch.randn(32, calm.TOY.context, calm.TOY.latent_dim)
    jobs = {}
    for name, (kw, step) in HEADS.items():
        torch.manual_seed(0)
        m = calm.CALM(replace(calm.TOY, **kw)).train()
        jobs[name] = (m, lambda m, step=step: m(x, step=step)[0])
    return jobs


def head_jobs():
    """The head alone on the 1-D two-mode mixture, sized as mixture.train_head_alone sizes it."""
    x0 = lambda: mixture.sample(mixture.TWO_MODES, 512)
    jobs = {}
    for name, (kw, step) in HEADS.items():
        torch.manual_seed(0)
        cfg = calm.Config(latent_dim=1, d_model=8, n_layers=1, n_heads=1, context=4,
                          short_context=0, head_width=64, head_blocks=2, head_batch_mul=1,
                          tangent_warmup=0, **kw)
        m = calm.CALM(cfg).train()
        jobs[name] = (m, lambda m, step=step: m.objective(torch.randn(512, 8), x0(), step)[0])
    return jobs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=1, help='torch threads (default 1)')
    p.add_argument('--rounds', type=int, default=7,
                   help='timed rounds after one warm-up round (default 7)')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # as train.py
    T = calm.TOY
    toy = (f'toy LM (calm.TOY, 32 x {T.context} frames, head {T.head_width} x {T.head_blocks}, '
           f'M = {T.head_batch_mul})')
    for title, jobs in [(toy, lm_jobs()),
                        ('head alone (1-D map test: width 64, 2 blocks, batch 512)', head_jobs())]:
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in jobs.items()}
        times, rates = {k: [] for k in jobs}, []
        for r in range(args.rounds + 1):
            rate = matmul_rate(repeats=4)
            for name, (m, fn) in jobs.items():
                t0 = time.perf_counter()
                loss = fn(m)
                opts[name].zero_grad()
                loss.backward()
                opts[name].step()
                if r > 0:   # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
            if r > 0:
                rates.append(rate)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f'{title}: s/step, median of {args.rounds} interleaved rounds, {args.threads} '
              f'thread(s); fp32 matmul meanwhile {statistics.median(rates):.0f} GFLOP/s (median; '
              f'{min(rates):.0f}-{max(rates):.0f})', flush=True)
        for k, v in med.items():
            print(f'  {k:16s} {v:.4f} s  ({v / med["TrigFlow"]:.2f}x TrigFlow, '
                  f'{v / med["sCT"]:.2f}x sCT)', flush=True)


if __name__ == '__main__':
    main()
