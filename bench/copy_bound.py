"""
The copy bound of a run's latents (docs/toy.md): how much of the LM's loss a perfect copier of the
toy's motif still pays, under each standardisation of the latents (vae.Config.latent_scale).

    python -m bench.copy_bound out/toy      # the run's VAE and latent cache, 512 clips

A toy clip repeats a motif, so frame t is predicted from frame t - L, L the motif's period in
frames. For each clip the best integer lag L in [12, 60) (about 1-5 s) gives the copy error
mean_t ||x_t - x_{t-L}||^2, shown as a share of the clip's variance mean_t ||x_t - mean(x)||^2:
0 for a signal that repeats exactly, about 2 for frames unrelated to each other. The VAE's
posterior means are not exactly periodic (onsets fall between frames, the instrument's noise), and
whatever is left is what the LM must model as noise. Per-dimension scaling blows low-variance dims
up to unit variance, and with them their share of that noise; one global scale leaves the share at
its size in the VAE. Also printed: each scaling's largest and smallest per-dim std after scaling.
Measured on the toy, the global scale's smaller copy error did not make the LM copy more
(docs/toy.md), so the bound describes the latents, not what an LM will reach.
"""
import argparse
import os
import sys

import numpy as np
import torch

import corpus


def copy_share(x, lags):
    """x [T, D] -> the smallest copy error over lags, as a share of x's variance."""
    var = ((x - x.mean(0)) ** 2).sum(1).mean()
    return min(((x[L:] - x[:-L]) ** 2).sum(1).mean() for L in lags) / var


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run', help='a run folder with vae.pt and its latent cache (latents.npy/json)')
    p.add_argument('--clips', type=int, default=512, help='clips to measure (default 512)')
    args = p.parse_args(argv)
    cache_path = os.path.join(args.run, 'latents')
    if not os.path.exists(cache_path + '.npy'):
        sys.exit(f'no latent cache in {args.run}: train its LM stage first (python train.py ...)')
    ckpt = torch.load(os.path.join(args.run, 'vae.pt'), map_location='cpu', weights_only=False)
    mean, std = (ckpt['model'][k].double().numpy() for k in ('latent_mean', 'latent_std'))
    cache = corpus.LatentCache(cache_path)
    n = min(args.clips, len(cache))
    raw = [np.asarray(cache[i], np.float64) * std + mean for i in range(n)]  # back to mu
    pooled = np.concatenate(raw)
    dim_std = pooled.std(0)
    scales = {'dim': dim_std, 'global': np.full_like(dim_std, np.sqrt((dim_std ** 2).mean()))}
    lags = range(12, 60)
    print(f'{args.run}: {n} clips, {len(dim_std)} dims; the stored scaling is '
          f'{"global" if np.ptp(std) == 0 else "dim"}')
    print('scaling | copy error / variance, mean over clips [95% interval] | per-dim std max/min')
    for name, s in scales.items():
        shares = np.array([copy_share((r - mean) / s, lags) for r in raw])
        boot = np.random.default_rng(0).choice(shares, (2000, n)).mean(1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        d = dim_std / s
        print(f'{name:7s} | {shares.mean():.3f} [{lo:.3f}, {hi:.3f}] | '
              f'{d.max():.2f} / {d.min():.3f}')


if __name__ == '__main__':
    main()
