"""
The consistency head's map against the exact PF-ODE map (docs/consistency.md): calm's head trained
alone on a Gaussian mixture with a known velocity (mixture.py), under variants of the sCT loss that
calm.py does not offer as options (tangent normalisation, time-feature scale, the toy's
TrigFlow-then-sCT schedule, EMA); and the LSD head (calm's loss, with --lsd-* variants:
pocket-tts's time pairs, a learnt weight on the LSD term).

    python -m bench.map --recipe sct --steps 3000 --tf-scale 10 --norm probe --seeds 0 1
    python -m bench.map --recipe lsd --steps 2000 --tf-scale 10 --seeds 0 1 2

Prints one JSON line per seed and a MEAN line: f1_* is the 1-step consistency map (LSD: the flow
map in one jump, f4_* in 4), ode100_* the same head used as a TrigFlow velocity for 100 ODE steps
(LSD: its diagonal); _med / _p90 the error to the exact end
point, _rho the rank correlation with the noise (1-D: the exact map is increasing; rho+ / rho-
within each mode), _frac+ the mass on the + mode (exact: 0.7), _same (4-D) the fraction landing in
the exact end point's mode.
"""
import argparse
import json
import math
import time

import numpy as np
import torch

import calm
import mixture

MIXTURES = {'1d': mixture.TWO_MODES, '4d': mixture.FIVE_MODES}


def variant_loss(a, n_diff, warm, D, gnorms):
    """The head's loss under the variant: TrigFlow for the first n_diff steps, then sCT with the
    tangent normalised by --norm (calm.py: 'probe'), adaptive weight as in CALM.objective."""
    def loss(m, z, x0, i):
        t = m.sample_t(a.batch, 'cpu')
        noise = torch.randn_like(x0)
        xt, dxt = calm.trigflow_interp(x0, noise, t)
        if i < n_diff:
            err = ((m.head(xt, t, z) - dxt) ** 2).mean(-1)
        else:
            r = min(1.0, (i - n_diff) / warm)
            Fn = lambda u, v: m.head(u, v, z)
            F_minus, g = calm.sct_tangent(Fn, xt, t, dxt, 1.0, r)
            gn = g.norm(dim=-1, keepdim=True)
            gnorms.append(gn.mean().item())
            if a.norm == 'sample':     # sCM: the tangent's own norm
                g = g / (gn + a.c)
            elif a.norm == 'rms':
                g = g / (gn / math.sqrt(D) + a.c)
            elif a.norm == 'probe':    # calm: the same tangent along an independent noise
                _, gu = calm.sct_tangent(Fn, xt, t, torch.randn_like(dxt), 1.0, r)
                g = g / (gu.norm(dim=-1, keepdim=True) + a.c)
            elif a.norm == 'batch':
                g = g / (gn.mean() + a.c)
            err = ((m.head(xt, t, z) - F_minus - g) ** 2).mean(-1)
        if m.weight_net is not None:
            w = m.weight_net(calm.time_features(t, 128, a.tf_scale))[:, 0]
            err = w.exp() * err - w
        return err.mean()
    return loss


def lsd_variant(a):
    """prepare(model) for mixture.train_head_alone: the --lsd-* variants of CALM.lsd_error
    (pocket-tts's time pairs, a learnt weight on the LSD term); returns the parameters they add."""
    def prepare(m):
        if a.lsd_pairs == 'uniform' and not a.lsd_adaptive:
            return []                                      # calm's own
        wl = torch.nn.Linear(256, 1) if a.lsd_adaptive else None
        if wl is not None:   # zero-init, as calm's w(t)
            torch.nn.init.zeros_(wl.weight)
            torch.nn.init.zeros_(wl.bias)

        def lsd_error(z, x0):
            k = max(1, round(1 / m.cfg.lsd_frac))
            z, x0 = z[::k], x0[::k]
            if a.lsd_pairs == 'proposal':   # the min and max of two draws of the proposal
                u = m.sample_t(2 * len(x0), x0.device).view(-1, 2)
            else:                            # uniform on the triangle, as calm
                u = (math.pi / 2 * torch.rand(len(x0), 2)).clamp(1e-3, math.pi / 2 - 1e-3)
            t, s = u.sort(1, descending=True).values.unbind(1)
            xt, _ = calm.trigflow_interp(x0, torch.randn_like(x0), t)
            err = (calm.lsd_residual(lambda p, q, e: m.head(p, q, z, e), xt, t, s) ** 2).mean(-1)
            if wl is None:
                return err
            tf = lambda v: calm.time_features(v, 128, a.tf_scale)
            w = wl(torch.cat([tf(t), tf(s)], -1))[:, 0]   # e^w(t,s) err - w(t,s), as sCM's w(t)
            return w.exp() * err - w
        m.lsd_error = lsd_error
        return [] if wl is None else list(wl.parameters())
    return prepare


def scores(y, end, xT, mix):
    """Errors of the maps y [N, D] against the exact end points, and (1-D) their order."""
    D = y.shape[1]
    e = (y - end).norm(dim=-1) / math.sqrt(D)
    res = {'med': round(e.median().item(), 4), 'p90': round(e.quantile(0.9).item(), 4)}
    if D == 1:
        o = torch.argsort(xT[:, 0])
        ys = y[o, 0].numpy()
        rank_corr = lambda v: round(float(np.corrcoef(np.argsort(np.argsort(v)),
                                                      np.arange(len(v)))[0, 1]), 4)
        res['rho'] = rank_corr(ys)    # Spearman with the noise: the exact map is increasing
        res['rho+'] = rank_corr(ys[(end[o, 0] > 0).numpy()])
        res['rho-'] = rank_corr(ys[(end[o, 0] < 0).numpy()])
        res['frac+'] = round((y[:, 0] > 0).float().mean().item(), 3)
    else:
        mu = mix[1].float()
        same = torch.cdist(end, mu).argmin(1) == torch.cdist(y, mu).argmin(1)
        res['same'] = round(same.float().mean().item(), 3)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mix', default='1d', choices=list(MIXTURES))
    p.add_argument('--recipe', default='sct', choices=['sct', 'trigflow', 'toy', 'lsd'],
                   help='sct from the start; trigflow only; toy: TrigFlow for --diff-frac, '
                        "then sCT at --sct-lr x lr; lsd: calm's LSD loss (CALM.objective)")
    p.add_argument('--lsd-frac', type=float, default=0.25, help='lsd: calm.Config.lsd_frac')
    p.add_argument('--lsd-weight', type=float, default=1.0, help='lsd: calm.Config.lsd_weight')
    p.add_argument('--lsd-pairs', default='uniform', choices=['uniform', 'proposal'],
                   help='lsd: times s < t uniform on the triangle (calm), or the min and max of '
                        'two draws of the log-normal proposal (pocket-tts, with its own proposal)')
    p.add_argument('--lsd-adaptive', type=int, default=0,
                   help='lsd: 1 = a learnt weight e^w(t,s) ||.||^2 - w(t,s) on the LSD term '
                        '(pocket-tts has one)')
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--diff-frac', type=float, default=600 / 950)
    p.add_argument('--sct-lr', type=float, default=0.1)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--batch', type=int, default=512)
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--blocks', type=int, default=2)
    p.add_argument('--tf-scale', type=float, default=100.0,
                   help='calm.Config.time_scale (calm: 10)')
    p.add_argument('--norm', default='sample', choices=['sample', 'probe', 'none', 'rms', 'batch'],
                   help='tangent normalisation: sample (sCM: its own norm), probe (calm: the norm '
                        'along an independent noise), none, rms, batch')
    p.add_argument('--c', type=float, default=0.1,
                   help='normalisation constant c in g / (||g|| + c)')
    p.add_argument('--adaptive', type=int, default=1)
    p.add_argument('--warmup', type=int, default=-1, help='tangent warmup steps (default steps/10)')
    p.add_argument('--P-mean', type=float, default=-1.0)
    p.add_argument('--P-std', type=float, default=1.4)
    p.add_argument('--ema', type=float, default=0.0)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--tag', default='')
    a = p.parse_args()
    torch.set_num_threads(1)

    mix = MIXTURES[a.mix]
    D = mix[1].shape[1]
    xT = torch.randn(2000, D, generator=torch.Generator().manual_seed(999))
    end = torch.as_tensor(mixture.ode_paths(mix, xT, 800)[1][-1]).float()
    rows = []
    for seed in a.seeds:
        n_diff = {'sct': 0, 'trigflow': a.steps, 'toy': round(a.diff_frac * a.steps),
                  'lsd': 0}[a.recipe]
        warm = a.warmup if a.warmup >= 0 else max(1, (a.steps - n_diff) // 10)
        t0 = time.time()
        gnorms = []
        lsd = a.recipe == 'lsd'   # calm's own loss (CALM.objective), or its --lsd-* variants
        m = mixture.train_head_alone(
            'lsd' if lsd else 'consistency', lambda n: mixture.sample(mix, n), D, a.steps, seed,
            a.batch, a.lr, loss_fn=None if lsd else variant_loss(a, n_diff, warm, D, gnorms),
            lr_scale=lambda i: a.sct_lr if (a.recipe == 'toy' and i >= n_diff) else 1.0,
            ema=a.ema, prepare=lsd_variant(a) if lsd else None, head_width=a.width,
            head_blocks=a.blocks, time_scale=a.tf_scale, P_mean=a.P_mean, P_std=a.P_std,
            adaptive_weight=bool(a.adaptive), lsd_frac=a.lsd_frac, lsd_weight=a.lsd_weight)
        secs = time.time() - t0
        with torch.no_grad():
            zz = torch.randn(len(xT), 8, generator=torch.Generator().manual_seed(5))
            Fn = lambda u, v: m.head(u, v, zz)
            one = calm.consistency_fn(Fn, xT, torch.full((len(xT),), math.pi / 2))
            # 100 ODE steps from the same noises: the sampler draws xT from the same seed
            ode100 = calm.trigflow_sample(Fn, xT.shape, 100,
                                          generator=torch.Generator().manual_seed(999))
            outs = [('f1', one), ('ode100', ode100)]
            if lsd:   # the flow map from the same noises, in 1 and in 4 jumps
                Fn2 = lambda u, v, e: m.head(u, v, zz, e)
                outs = [(f'f{n}', calm.flow_map_sample(
                    Fn2, xT.shape, n, generator=torch.Generator().manual_seed(999)))
                    for n in (1, 4)] + [('ode100', ode100)]
        res = {'seed': seed, 'secs': round(secs, 1)}
        for name, y in outs:
            res.update({f'{name}_{k}': v for k, v in scores(y, end, xT, mix).items()})
        if gnorms:
            res['gnorm_end'] = round(float(np.mean(gnorms[-100:])), 3)
        print(json.dumps({**vars(a), **res}), flush=True)
        rows.append(res)
    keys = [k for k in rows[0] if k != 'seed']
    means = ' '.join(f'{k}={np.mean([r[k] for r in rows]):.4g}' for k in keys)
    print(f'MEAN {a.tag} {means}', flush=True)


if __name__ == '__main__':
    main()
