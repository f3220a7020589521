"""The consistency head's map against the exact PF-ODE map (docs/consistency.md): calm's head trained alone
on a Gaussian mixture with a known velocity, under variants of the sCT loss that calm.py does not offer as
options (tangent normalisation, time-feature scale, the toy's TrigFlow-then-sCT schedule, EMA).

    python bench_map.py --recipe sct --steps 3000 --tf-scale 10 --norm probe --seeds 0 1

Prints one JSON line per seed and a MEAN line: f1_* is the 1-step consistency map, ode100_* the same head
used as a TrigFlow velocity for 100 ODE steps; _med / _p90 the error to the exact end point, _rho the rank
correlation with the noise (1-D: the exact map is increasing; rho+ / rho- within each mode), _frac+ the
mass on the + mode (exact: 0.7), _same (4-D) the fraction landing in the exact end point's mode.
"""
import argparse
import json
import math
import sys
import time

import numpy as np
import torch

sys.path.insert(0, '.')
import calm  # noqa
import tour  # noqa

torch.set_num_threads(1)


def mixture(kind):
    """'1d': figure 03's two-mode toy; '4d': tests/test_calm.py's 5 modes in 4 dims."""
    if kind == '1d':
        return tour.TOY
    sys.path.insert(0, 'tests')
    import test_calm
    return test_calm.MIXTURES['4d']


def sample_data(n, mix):
    return tour.sample_mixture(mix, n)


def exact_end(xT, mix):
    return torch.as_tensor(tour.ode_paths(mix, xT, 800)[1][-1])


def ode(Fn, xT, steps):
    x = xT
    ts = calm.trigflow_times(steps)
    for t, s in zip(ts[:-1], ts[1:]):
        x = math.cos(t - s) * x - math.sin(t - s) * Fn(x, torch.full((x.shape[0],), t))
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mix', default='1d')
    p.add_argument('--recipe', default='sct', choices=['sct', 'trigflow', 'toy'],
                   help='sct from the start; trigflow only; toy: TrigFlow for --diff-frac, then sCT at --sct-lr x lr')
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--diff-frac', type=float, default=600 / 950)
    p.add_argument('--sct-lr', type=float, default=0.1)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--batch', type=int, default=512)
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--blocks', type=int, default=2)
    p.add_argument('--tf-scale', type=float, default=100.0, help='calm.Config.time_scale (calm: 10)')
    p.add_argument('--norm', default='sample', 
                   help='tangent normalisation: sample (sCM: its own norm), probe (calm: the norm along an '
                        'independent noise), none, rms, batch')
    p.add_argument('--c', type=float, default=0.1, help='normalisation constant c in g / (||g|| + c)')
    p.add_argument('--adaptive', type=int, default=1)
    p.add_argument('--warmup', type=int, default=-1, help='tangent warmup steps (default steps/10)')
    p.add_argument('--P-mean', type=float, default=-1.0)
    p.add_argument('--P-std', type=float, default=1.4)
    p.add_argument('--ema', type=float, default=0.0)
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--tag', default='')
    a = p.parse_args()

    mix = mixture(a.mix)
    D = mix[1].shape[1]
    gN = torch.Generator().manual_seed(999)
    xT = torch.randn(2000, D, generator=gN)
    end = exact_end(xT, mix).float()
    rows = []
    for seed in a.seeds:
        torch.manual_seed(seed)
        cfg = calm.Config(latent_dim=D, d_model=8, n_layers=1, n_heads=1, context=4, short_context=0,
                          head_width=a.width, head_blocks=a.blocks, head_batch_mul=1,
                          head_loss='consistency', time_scale=a.tf_scale, P_mean=a.P_mean, P_std=a.P_std,
                          adaptive_weight=bool(a.adaptive))
        m = calm.CALM(cfg)
        params = list(m.head.parameters()) + (list(m.weight_net.parameters()) if m.weight_net is not None else [])
        opt = torch.optim.Adam(params, lr=a.lr)
        ema = [q.detach().clone() for q in m.head.parameters()] if a.ema else None
        n_diff = {'sct': 0, 'trigflow': a.steps, 'toy': round(a.diff_frac * a.steps)}[a.recipe]
        warm = a.warmup if a.warmup >= 0 else max(1, (a.steps - n_diff) // 10)
        t0 = time.time()
        gnorms = []
        for i in range(a.steps):
            lr = a.lr * (1 - i / a.steps) * (a.sct_lr if (a.recipe == 'toy' and i >= n_diff) else 1.0)
            for gr in opt.param_groups:
                gr['lr'] = lr
            z = torch.randn(a.batch, 8)
            x0 = sample_data(a.batch, mix)
            t = m.sample_t(a.batch, 'cpu')
            noise = torch.randn_like(x0)
            xt, dxt = calm.trigflow_interp(x0, noise, t)
            if i < n_diff:
                err = ((m.head(xt, t, z) - dxt) ** 2).mean(-1)
            else:
                r = min(1.0, (i - n_diff) / warm)
                F_minus, g = calm.sct_tangent(lambda u, v: m.head(u, v, z), xt, t, dxt, 1.0, r)
                gn = g.norm(dim=-1, keepdim=True)
                gnorms.append(gn.mean().item())
                if a.norm == 'sample':
                    g = g / (gn + a.c)
                elif a.norm == 'rms':
                    g = g / (gn / math.sqrt(D) + a.c)
                elif a.norm == 'probe':   # the same tangent along an independent noise direction
                    _, gu = calm.sct_tangent(lambda u, v: m.head(u, v, z), xt, t, torch.randn_like(dxt), 1.0, r)
                    g = g / (gu.norm(dim=-1, keepdim=True) + a.c)
                elif a.norm == 'batch':
                    g = g / (gn.mean() + a.c)
                err = ((m.head(xt, t, z) - F_minus - g) ** 2).mean(-1)
            if m.weight_net is not None:
                w = m.weight_net(calm.time_features(t, 128, a.tf_scale))[:, 0]
                err = w.exp() * err - w
            loss = err.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, q in zip(ema, m.head.parameters()):
                        e.lerp_(q, 1 - a.ema)
        secs = time.time() - t0
        if ema is not None:
            with torch.no_grad():
                for e, q in zip(ema, m.head.parameters()):
                    q.copy_(e)
        m.eval()
        with torch.no_grad():
            zz = torch.randn(len(xT), 8, generator=torch.Generator().manual_seed(5))
            Fn = lambda u, v: m.head(u, v, zz)
            one = calm.consistency_fn(Fn, xT, torch.full((len(xT),), math.pi / 2))
            ode100 = ode(Fn, xT, 100)
        res = {'seed': seed, 'secs': round(secs, 1)}
        for name, y in [('f1', one), ('ode100', ode100)]:
            e = (y - end).norm(dim=-1) / math.sqrt(D)
            res[name + '_med'] = round(e.median().item(), 4)
            res[name + '_p90'] = round(e.quantile(0.9).item(), 4)
            if D == 1:
                o = torch.argsort(xT[:, 0])
                ys = y[o, 0].numpy()
                # Spearman rank correlation with the noise (exact map is monotone)
                rk = np.argsort(np.argsort(ys))
                res[name + '_rho'] = round(float(np.corrcoef(rk, np.arange(len(rk)))[0, 1]), 4)
                # within the + mode (exact end > 0): rank correlation
                sel = (end[o, 0] > 0).numpy()
                rk2 = np.argsort(np.argsort(ys[sel]))
                res[name + '_rho+'] = round(float(np.corrcoef(rk2, np.arange(len(rk2)))[0, 1]), 4)
                sel = (end[o, 0] < 0).numpy()
                rk2 = np.argsort(np.argsort(ys[sel]))
                res[name + '_rho-'] = round(float(np.corrcoef(rk2, np.arange(len(rk2)))[0, 1]), 4)
                res[name + '_frac+'] = round((y[:, 0] > 0).float().mean().item(), 3)
            else:
                mu = mix[1].float()
                ke = torch.cdist(end, mu).argmin(1)
                km = torch.cdist(y, mu).argmin(1)
                res[name + '_same'] = round((ke == km).float().mean().item(), 3)
        if gnorms:
            res['gnorm_end'] = round(float(np.mean(gnorms[-100:])), 3)
        print(json.dumps({**vars(a), **res}), flush=True)
        rows.append(res)
    keys = [k for k in rows[0] if k not in ('seed',)]
    print('MEAN ' + a.tag + ' ' + ' '.join(f'{k}={np.mean([r[k] for r in rows]):.4g}' for k in keys), flush=True)


if __name__ == '__main__':
    main()
