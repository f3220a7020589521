"""
Benchmark (not a test): where one training step of each toy model spends its time, and how far each
part is from this CPU's matmul rate measured in the same run.

    python -m bench.profile                        # every part, 2 threads, the toy recipes
    python -m bench.profile --parts lm --lm.head_width=128 --lm.head_blocks=2 --lm.head_batch_mul=1
    python -m bench.profile --parts lm --batch 64 --window 128   # another LM recipe's step
    python -m bench.profile --bf16                 # the same under bf16 autocast (AMX CPUs)

Parts (each the median over --repeats steps, after 2 warm-up steps, random latents and audio):
  lm (CALM, consistency head, sCT phase) and lm (TrigFlow phase): data (corpus.window_batch from
      a cache of 4096 random clips), backbone forward, head forward of the M copies (the sCT JVPs
      apart), head backward, backbone backward, optimizer (gradient clipping + AdamW);
  rq: the RQ-Transformer baseline's step (rq.py; untrained RVQ), forward + backward and optimizer;
  vae: a toy VAE step (16 crops x 1 s), forward + backward and optimizer;
  encode: rendering toy clips (data.make_clip) and vae.encode one clip at a time and 32 at a time.
FLOPs are counted by torch.utils.flop_counter (matmuls, convolutions and attention; elementwise work
is not counted), so GFLOP/s is the rate of the counted work and '% mm' compares it with a large fp32
matmul (or bf16 with --bf16) timed in the same process. Timings on a shared machine are inflated.
"""
import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import calm
import corpus
import data
import rq
import vae as vae_lib

# The toy recipes of train.py (RECIPES, TOY_CLIPS), which this benchmark does not import: the LM
# trains on 32 windows of the context at lr 4e-3 (weight decay 0.01) from the latents of 4096 clips
# of 8 s; the VAE on 16 crops of 1 s at lr 2e-3.
LM = dict(batch=32, lr=4e-3, wd=0.01, clips=4096, seconds=8.0)
VAE = dict(batch=16, crop=1.0, lr=2e-3, wd=0.0)


def adamw(model, lr, wd, betas):
    """train.make_optimizer's AdamW: weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': wd},
                              {'params': other, 'weight_decay': 0.0}], lr=lr, betas=betas)


def lm_optimizer(model):
    return adamw(model, LM['lr'], LM['wd'], (0.9, 0.95))


def matmul_rate(dtype=torch.float32, n=1024, repeats=20):
    """GFLOP/s of an n x n x n matmul, the best of `repeats`: the machine's limit for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float('inf')
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


JVPS = '  of which sCT JVPs'   # a part inside 'head forward'


class Parts:
    """Per-part timings (seconds, one list per part) and FLOPs (counted once per part)."""

    def __init__(self):
        self.times, self.flops, self.calls = {}, {}, {}

    def time(self, name, fn, count=False):
        if count:
            with FlopCounterMode(display=False) as fc:
                out = fn()
            self.flops[name] = self.flops.get(name, 0) + fc.get_total_flops()
            self.calls[name] = self.calls.get(name, 0) + 1
            return out
        t = time.perf_counter()
        out = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - t)
        return out

    def rows(self):
        """Median seconds per part, and their total (a part indented under another is inside it)."""
        med = {k: statistics.median(v) for k, v in self.times.items()}
        return med, sum(v for k, v in med.items() if not k.startswith(' '))


def optimizer_step(model, opt):
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_step(model, opt, batch_fn, parts, step, count, autocast):
    """One train.py LM step (calm.CALM.forward, backward, optimizer), cut where the time goes: the
    head's loss on a detached z, then the backbone's backward from z's gradient (the gradients
    loss.backward() gives through the whole model)."""
    x, text = parts.time('data', lambda: batch_fn(step), count)

    def backbone():
        with autocast:
            c = model.condition(text)
            return model.conditioning(model.noise_augment(x, step), x, c)
    z = parts.time('backbone forward', backbone, count)
    zd = z.detach().requires_grad_()

    def head():
        with autocast:
            flat = zd.reshape(-1, zd.shape[-1])
            loss = model.objective(flat, x.reshape(-1, x.shape[-1]), step)[0]
            if model.readout is not None:   # cfg.readout_weight: tiny next to the head
                loss = loss + model.cfg.readout_weight * ((model.readout(zd) - x) ** 2).mean()
            return loss
    loss = parts.time('head forward (M copies)', head, count)
    parts.time('head backward', lambda: loss.backward(), count)
    if zd.grad is not None:   # None: nothing reaches the backbone (cfg.sct_head_only, no readout)
        parts.time('backbone backward', lambda: z.backward(zd.grad), count)
    parts.time('optimizer', lambda: optimizer_step(model, opt), count)


def whole_step(model, opt, batch_fn, parts, step, count, autocast, args=()):
    x = parts.time('data', lambda: batch_fn(step), count)

    def forward():
        with autocast:
            return model(x, *args)[0]
    loss = parts.time('forward', forward, count)
    parts.time('backward', lambda: loss.backward(), count)
    parts.time('optimizer', lambda: optimizer_step(model, opt), count)


def run(parts, step_fn, repeats):
    """step_fn(i, count): one step; the first counts FLOPs (and warms up), the second warms up, then
    `repeats` timed steps."""
    step_fn(0, True)
    step_fn(1, False)
    parts.times.clear()
    for i in range(repeats):
        step_fn(2 + i, False)
    return parts


def random_latents(cfg, frames):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(frames, cfg.latent_dim, generator=g) for _ in range(LM['clips'])]


def profile_lm(cfg, batch, window, args, autocast):
    """[(name, Parts)] of an sCT step and a TrigFlow step of the LM with config cfg, on random
    latents in a cache of LM['clips'] clips."""
    latents = random_latents(cfg, max(100, window))
    texts = [data.tokenize(data.clip_description(data.clip_seed('train', i)))
             for i in range(len(latents))]
    batch_fn = lambda s: corpus.window_batch(latents, s, 0, batch, window, 0, texts)
    return [(f"lm, {'sCT' if loss == 'consistency' else 'TrigFlow'} phase",
             profile_phase(dataclasses.replace(cfg, head_loss=loss), step, batch_fn, args,
                           autocast))
            for loss, step in (('consistency', cfg.diffusion_steps + cfg.tangent_warmup),
                               ('trigflow', 0))]


def profile_phase(cfg, step, batch_fn, args, autocast):
    """The parts of LM steps from `step` on, the sCT JVPs (calm.sct_tangent) timed apart."""
    torch.manual_seed(0)
    model = calm.CALM(cfg)
    opt = lm_optimizer(model)
    parts, orig, counting = Parts(), calm.sct_tangent, [True]
    calm.sct_tangent = lambda *a, **k: parts.time(JVPS, lambda: orig(*a, **k), counting[0])

    def one(i, count):
        counting[0] = count
        lm_step(model, opt, batch_fn, parts, step + i, count, autocast)
    try:
        run(parts, one, args.repeats)
    finally:
        calm.sct_tangent = orig
    if JVPS in parts.flops:
        # flop_counter counts functorch's jvp at both of its levels (more than the machine can do in
        # the time measured); count each JVP as the head's primal and tangent passes instead: 2x the
        # head forward that the same loss also runs once outside the JVPs.
        head = parts.flops['head forward (M copies)'] - parts.flops[JVPS]
        parts.flops[JVPS] = 2 * parts.calls[JVPS] * head
        parts.flops['head forward (M copies)'] = head + parts.flops[JVPS]
    return parts


def profile_rq(cfg, batch, args, autocast):
    rcfg = rq.config_like(dataclasses.replace(cfg, n_text=0), kind='rq')
    torch.manual_seed(0)
    model = rq.build(rcfg)
    opt = lm_optimizer(model)
    latents = random_latents(cfg, 100)
    batch_fn = lambda s: corpus.window_batch(latents, s, 0, batch, cfg.context)
    parts = Parts()
    step = lambda i, c: whole_step(model, opt, batch_fn, parts, i, c, autocast, (i,))
    run(parts, step, args.repeats)
    return f'rq (Q={rcfg.n_q}, V={rcfg.codebook_size})', parts


def profile_vae(args, autocast):
    cfg = vae_lib.TOY
    torch.manual_seed(0)
    model = vae_lib.VAE(cfg)
    opt = adamw(model, VAE['lr'], VAE['wd'], (0.8, 0.99))
    clips = [c.wav for c in data.toy_clips('train', 16, 8.0)]
    length = int(VAE['crop'] * cfg.sample_rate) // model.hop * model.hop
    batch_fn = lambda s: torch.from_numpy(data.crop_batch(clips, s, 0, VAE['batch'], length))
    parts = Parts()
    run(parts, lambda i, c: whole_step(model, opt, batch_fn, parts, i, c, autocast), args.repeats)
    return 'vae', parts


@torch.no_grad()
def profile_encode(args, autocast):
    """Rendering and encoding rates of the LM stage's toy clips."""
    torch.manual_seed(0)
    vae = vae_lib.VAE(vae_lib.TOY).eval()
    n = args.encode_clips
    parts = Parts()
    wavs = [parts.time('render (data.make_clip)', lambda i=i: data.make_clip(
        data.clip_seed('train', 512 + i), LM['seconds']).wav) for i in range(n)]
    x, b = torch.from_numpy(np.stack(wavs)), min(32, n)
    with autocast:
        vae.encode(x[:1])
        parts.time('encode, 1 clip per call', lambda: [vae.encode(x[i:i + 1]) for i in range(n)])
        parts.time(f'encode, {b} clips per call',
                   lambda: [vae.encode(x[i:i + b]) for i in range(0, n, b)])
        with FlopCounterMode(display=False) as fc:
            vae.encode(x[:b])
    per_clip = fc.get_total_flops() / b
    gflop = lambda k: per_clip * n / 1e9 if 'encode' in k else None
    return {k: {'s': sum(v), 'clips_s': n / sum(v), 'gflop': gflop(k)}
            for k, v in parts.times.items()}


def report(name, parts, peak):
    med, total = parts.rows()
    print(f'\n{name}: {total * 1000:.1f} ms per step')
    print(f"  {'part':32s} {'ms':>8s} {'share':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'% mm':>5s}")
    order = [k for k in med if k != JVPS]
    if JVPS in med:   # under the part it is inside
        order.insert(order.index('head forward (M copies)') + 1, JVPS)
    for k in order:
        v, f = med[k], parts.flops.get(k, 0) / 1e9
        rate = f / v if v > 0 else 0
        print(f'  {k:32s} {v * 1000:8.1f} {v / total:6.1%} {f:7.2f} {rate:8.1f} {rate / peak:5.0%}')
    f = sum(v for k, v in parts.flops.items() if not k.startswith('  ')) / 1e9
    rate = f / total
    print(f"  {'total':32s} {total * 1000:8.1f} {1:6.0%} {f:7.2f} {rate:8.1f} {rate / peak:5.0%}")
    return {'ms': total * 1000, 'parts_ms': {k: v * 1000 for k, v in med.items()},
            'gflop': {k: v / 1e9 for k, v in parts.flops.items()}}


def lm_config(overrides, p):
    """calm.TOY, text-conditioned as the toy trains, with --lm.FIELD=VALUE overrides (numbers and
    booleans, as train.py takes them)."""
    cfg = dataclasses.replace(calm.TOY, n_text=len(data.VOCAB))
    changes = {}
    for item in overrides:
        key, eq, value = item.partition('=')
        field = key[len('--lm.'):]
        if not (eq and key.startswith('--lm.') and hasattr(cfg, field)):
            p.error(f'unrecognized argument: {item} (give --lm.FIELD=VALUE, a calm.Config field)')
        kind = type(getattr(cfg, field))
        try:
            changes[field] = (value.lower() in ('1', 'true', 'yes', 'on') if kind is bool
                              else kind(value))
        except ValueError:
            p.error(f'{item}: {field} takes a {kind.__name__}')
    return dataclasses.replace(cfg, **changes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=2, help='torch threads (default 2)')
    p.add_argument('--parts', default='lm,rq,vae,encode', help='comma list of lm, rq, vae, encode')
    p.add_argument('--repeats', type=int, default=6, help='timed steps per part (median)')
    p.add_argument('--batch', type=int, default=LM['batch'],
                   help=f"LM windows per step (default {LM['batch']}, the toy recipe's)")
    p.add_argument('--window', type=int, help='LM training window in frames (default: the context)')
    p.add_argument('--encode-clips', type=int, default=64, help='clips rendered and encoded')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast (CPUs with AMX; not the toy)')
    args, rest = p.parse_known_args(argv)
    parts = args.parts.split(',')
    if set(parts) - {'lm', 'rq', 'vae', 'encode'}:
        p.error(f'--parts: choose from lm, rq, vae, encode (got {args.parts})')
    cfg = lm_config(rest, p)
    window = args.window or cfg.context
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16)
    peak = matmul_rate(torch.bfloat16 if args.bf16 else torch.float32)
    print(f"{args.threads} threads | {'bf16' if args.bf16 else 'fp32'} matmul 1024^3: {peak:.0f} "
          f"GFLOP/s | LM: {args.batch} windows x {window} frames, d {cfg.d_model} x "
          f"{cfg.n_layers} layers, head {cfg.head_width} x {cfg.head_blocks}, "
          f"M = {cfg.head_batch_mul}")
    results = {}
    if 'lm' in parts:
        for name, pr in profile_lm(cfg, args.batch, window, args, autocast):
            results[name] = report(name, pr, peak)
    if 'rq' in parts:
        results['rq'] = report(*profile_rq(cfg, args.batch, args, autocast), peak)
    if 'vae' in parts:
        results['vae'] = report(*profile_vae(args, autocast), peak)
    if 'encode' in parts:
        rows = profile_encode(args, autocast)
        print(f"\nencode stage, {args.encode_clips} toy clips of {LM['seconds']:g} s (the LM stage "
              f"renders and encodes {LM['clips']}):")
        for k, r in rows.items():
            g = '' if r['gflop'] is None else (f" | {r['gflop'] / r['s']:.0f} GFLOP/s "
                                               f"({r['gflop'] / r['s'] / peak:.0%} mm)")
            print(f"  {k:28s} {r['clips_s']:7.1f} clips/s "
                  f"({r['clips_s'] * LM['seconds']:.0f}x real time){g}")
        results['encode'] = rows
    return {'peak_gflops': peak, 'results': results}


if __name__ == '__main__':
    main()
