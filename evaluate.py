"""
Evaluate a trained run folder (vae.pt + calm.pt) on held-out toy clips: the reports. The measures
they are made of live in metrics.py; read this after sample.py.

    python evaluate.py --ckpt out/toy                     # all sections, prints tables
    python evaluate.py --ckpt out/toy --json out/eval.json --clips 32 --steps 1,4
    python evaluate.py --compare --vae-from out/toy --lm-steps 2000   # equal-budget ablations
    python evaluate.py --table out/toy out/rq out/delay   # continuous vs discrete (docs/discrete)

A run may hold a discrete baseline (train.py --model rq|delay): it is scored the same way, at its
softmax temperatures. --table puts several runs in one comparison: codec rows (decoded quality and
bits per frame of the Gaussian latents vs RVQ codes of them, per level count Q; and the round trip
of every RVQ codec trained end to end that a run's LM reads), the continuation
rows of every run, and batch-1 cost per frame split into backbone and head, in ms and FLOPs
(`table_speed`).

Sections (the kinds of measure the paper reports, on the toy task):
- vae: held-out reconstructions: note-pitch accuracy (metrics.note_pitch_accuracy; 'real': on the
  clip itself, the pitch estimator's ceiling), log-mel L1, SI-SDR (dB).
- continuation: the prompt of a held-out clip (default: its first two repetitions of the motif,
  4.9 s on average; or --prompt-seconds) is encoded, continued for --continue-seconds (batch 1,
  fixed seed) and decoded, and the continued span is scored against the clip's TRUE continuation,
  pooled over clips (metrics.score_continuation, summarise):
    note_acc  true notes whose pitch, estimated from the generated audio, is the annotated one
    onset_r / onset_p / onset_f1  transcribed notes (metrics.transcribe) matching a true note's
              pitch within +-tol s of its onset: recall / precision / F1
    key       transcribed pitch classes inside the clip's scale
    timbre    clips whose continuation the timbre detector assigns to the clip's family
    mel_db    mean over clips of the distance (dB) between the continued span's mel spectrogram
              and the clip's OWN true continuation's, both floored 60 dB under the truth's
              loudest bin (metrics.mel_distance): paired, so it ranks the VAE round trip of the
              truth first and noise last (docs/discrete.md, "A distance that ranks")
    fd        Frechet distance between the continued spans and the real continued spans of OTHER
              held-out clips, on a fixed log-mel embedding (metrics.embed, metrics.frechet); it
              rewards a spread of steady frames like the reference set's and can rank a model
              above the VAE round trip of the truth (docs/discrete.md)
  Beside note_acc, key and timbre: a 95% interval from resampling the clips (metrics.bootstrap_ci;
  paired: the same resamples for every row). On the default 128 clips, rows whose intervals do
  not overlap differ.
  Reference rows: 'real' (the true continuation: the ceiling; mel_db 0), 'vae' (the clip
  through the VAE: what a perfect LM could reach), 'other clip' (another clip's true continuation:
  chance), 'noise' (white noise, fd only).
- speed: batch 1, best of 2: ms per generated frame at 1/4/100 sampler steps over 10 s (on a
  consistency model '100 steps' is 100 calls of the head), the head cost per step (the slope) and
  the backbone cost per frame, real-time factors, 10 s vs 30 s, VAE decoding; and for every LM
  (time_parts) the backbone, head and whole frame of one 10 s generation timed inside its loop
  (the parts add up to the frame), with their FLOPs (torch.utils.flop_counter), which do not
  depend on the machine.
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch.utils import flop_counter

import calm
import corpus
import data
import metrics
import pipeline
import rq


class Progress:
    """'[name] i/N  rate/s  ETA s' lines on stderr."""

    def __init__(self, name, total):
        self.name, self.total, self.t0 = name, total, time.time()

    def __call__(self, i):
        rate = i / max(time.time() - self.t0, 1e-9)
        eta = (self.total - i) / max(rate, 1e-9)
        print(f'[{self.name}] {i}/{self.total}  {rate:.2f}/s  ETA {eta:.0f}s', file=sys.stderr,
              flush=True)


def temp_kwargs(temperature):
    return {} if temperature is None else {'temperature': temperature}  # None: the model's default


def tlabel(temperature):
    return 'default' if temperature is None else f'{temperature:g}'


def row_name(model, steps, temperature):
    """'calm steps=4 T=0.8', or for a discrete LM (one code per level, no head steps) 'rq T=0.8'."""
    steps = f' steps={steps}' if model.multistep else ''
    return f'{model.kind}{steps} T={tlabel(temperature)}'


# --------------------------------------------------------------------------------------------------
# The sections of one run

@torch.inference_mode()
def eval_vae(vae, clips, device, batch=8, quantise=None, name='vae'):
    """quantise: latents -> latents (the codec rows: RVQ codes of the latents, dequantised)."""
    sr, res = data.SR, dict(note_acc_real=[], note_acc=[], log_mel_l1=[], si_sdr=[])
    prog = Progress(name, len(clips))
    for i in range(0, len(clips), batch):
        chunk = clips[i:i + batch]
        x = torch.tensor(np.stack([c.wav for c in chunk]), device=device)
        z = vae.encode(x)
        y = vae.decode((quantise or vae.quantise)(z)).float().cpu().numpy()[:, :x.shape[1]]
        for c, rec in zip(chunk, y):
            res['note_acc_real'].append(metrics.note_pitch_accuracy(c.wav, c.notes, sr))
            res['note_acc'].append(metrics.note_pitch_accuracy(rec, c.notes, sr))
            res['log_mel_l1'].append(metrics.log_mel_l1(c.wav, rec, sr))
            res['si_sdr'].append(metrics.si_sdr(c.wav, rec))
        prog(min(i + batch, len(clips)))
    return {k: float(np.mean(v)) for k, v in res.items()} | {'n_clips': len(clips)}


def eval_continuation(vae, model, clips, ref_clips, detector, args, device):
    """Rows of scores (see module docstring). clips: the scored clips (long enough for prompt +
    continuation); ref_clips: other held-out clips whose real continuations are the Frechet
    reference set."""
    sr, hop, fr = data.SR, vae.hop, vae.frame_rate
    c = int(round(args.continue_seconds * fr))
    spans = lambda cl: [(p, p + c) for p in (metrics.prompt_frames(x, fr, args.prompt_seconds)
                                             for x in cl)]
    span, ref_span = spans(clips), spans(ref_clips)
    cut = lambda w, s: np.asarray(w[s[0] * hop:s[1] * hop], np.float32)  # a wav's continued span
    ref_emb = metrics.embed([cut(x.wav, s) for x, s in zip(ref_clips, ref_span)], sr)

    def row(wavs, with_fd=True):
        counts = [metrics.score_continuation(w, x, a * hop / sr, b * hop / sr, sr, args.tol,
                                             detector) for x, w, (a, b) in zip(clips, wavs, span)]
        emb = metrics.embed([cut(w, s) for w, s in zip(wavs, span)], sr) if with_fd else None
        fd = metrics.frechet(emb, ref_emb) if with_fd else None
        ci = metrics.bootstrap_ci(counts, seed=args.seed)
        return {**metrics.summarise(counts, fd=fd), **ci, 'per_clip': counts}

    rows = {'real': row([x.wav for x in clips]),
            # a set-level distance cannot see that clips were swapped: no fd for this row
            'other clip': row([clips[(i + 1) % len(clips)].wav for i in range(len(clips))],
                              with_fd=False)}
    rng = np.random.default_rng(args.seed)
    noise = [0.1 * rng.standard_normal(c * hop) for _ in clips]
    rows['noise'] = {'fd': metrics.frechet(metrics.embed(noise, sr), ref_emb),
                     'mel_db': float(np.mean([metrics.mel_distance(w, cut(x.wav, s), sr)
                                              for w, x, s in zip(noise, clips, span)]))}
    with torch.inference_mode():
        through = lambda w: vae.decode(vae.quantise(vae.encode(torch.tensor(w[None],
                                                                            device=device))))[0]
        rows['vae'] = row([through(x.wav[:b * hop]).float().cpu().numpy()
                           for x, (a, b) in zip(clips, span)])
    for steps in (args.steps if model.multistep else [1]):
        for temp in args.temperature:
            g = torch.Generator(device=device).manual_seed(args.seed)  # one noise for every setting
            prog, wavs = Progress(f'gen steps={steps} T={tlabel(temp)}', len(clips)), []
            for i, (x, (a, b)) in enumerate(zip(clips, span)):
                wavs.append(pipeline.continue_clip(vae, model, x, a, b - a, steps, temp, g, device))
                prog(i + 1)
            rows[row_name(model, steps, temp)] = row(wavs)
    m = [len(x.meta['motif']) for x in clips]
    two = [2 * k <= len(x.notes) and x.notes[2 * k - 1].onset < a * hop / sr
           for x, k, (a, b) in zip(clips, m, span)]
    prompt = f'{args.prompt_seconds} s' if args.prompt_seconds else 'auto (2 motif repetitions)'
    settings = dict(n_clips=len(clips), prompt_s_mean=float(np.mean([a for a, b in span])) / fr,
                    prompt=prompt, continue_s=c / fr, tol=args.tol, seed=args.seed,
                    prompt_has_2_motifs=float(np.mean(two)),
                    fd_embedding='metrics.log_mel, 4 stacked frames -> seeded random projection to '
                                 f'32 dims; reference = real continuations of {len(ref_clips)} '
                                 'other held-out clips')
    return dict(settings=settings, rows=rows)


@torch.inference_mode()
def eval_speed(vae, model, clip, args, device):
    """Batch-1 timings. ms/frame at steps in (1, 4, 100) over a 10 s continuation; the head cost per
    step is the slope (t(100) - t(1)) / 99 and the backbone(+short context) cost per frame is
    t(1) - head; on a consistency model '100 steps' is 100 evaluations of the same head (the
    per-step head cost is what is measured), on a TrigFlow model it is the 100-step PF-ODE
    sampler."""
    fr = vae.frame_rate
    p = metrics.prompt_frames(clip, fr, args.prompt_seconds)
    prompt = vae.encode(torch.tensor(clip.wav[None, :p * vae.hop], device=device))
    prompt = prompt[:, -getattr(getattr(model, 'cfg', None), 'context', p):]

    def ms_per_frame(n, steps, repeats=2):  # best of `repeats`: the machine may be shared
        best = float('inf')
        for _ in range(repeats):
            g = torch.Generator(device=device).manual_seed(0)
            t = time.perf_counter()
            model.generate(prompt, n, steps=steps, generator=g, **temp_kwargs(args.temperature[0]))
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            best = min(best, 1000 * (time.perf_counter() - t) / n)
        return best

    ms_per_frame(4, 1, repeats=1)  # warm-up
    n10, n30 = int(round(10 * fr)), int(round(30 * fr))
    out = {f'ms_per_frame_steps{s}': ms_per_frame(n10, s, repeats=1 if s == 100 else 2)
           for s in (1, 4, 100)}
    print('[speed] steps 1/4/100 done', file=sys.stderr, flush=True)
    out['head_ms_per_step'] = (out['ms_per_frame_steps100'] - out['ms_per_frame_steps1']) / 99
    out['backbone_ms_per_frame'] = out['ms_per_frame_steps1'] - out['head_ms_per_step']
    for s in (1, 4, 100):
        out[f'rtf_steps{s}'] = out[f'ms_per_frame_steps{s}'] / 1000 * fr  # generation s / audio s
    out['ms_per_frame_10s_steps1'] = out['ms_per_frame_steps1']
    out['ms_per_frame_30s_steps1'] = ms_per_frame(n30, 1)
    lat = torch.zeros(1, n10, prompt.shape[-1], device=device)
    t = time.perf_counter()
    vae.decode(lat)
    out['vae_decode_rtf'] = (time.perf_counter() - t) / 10.0
    out['head_loss'] = getattr(getattr(model, 'cfg', None), 'head_loss', None)
    out['threads'] = torch.get_num_threads()
    return out


def text_adherence(wavs, metas, detector, sr=data.SR):
    """Fraction of clips whose detected family / mode / tempo class equals the description's."""
    hit = {'timbre': [], 'mode': [], 'tempo': []}
    for w, m in zip(wavs, metas):
        hit['timbre'].append(detector.predict(w) == m['family'])
        hit['mode'].append(metrics.detect_mode(w, sr) == m['mode'])
        hit['tempo'].append(metrics.detect_tempo_class(w, sr) == m['tempo_class'])
    return {k: float(np.mean(v)) for k, v in hit.items()}


@torch.inference_mode()
def eval_text(vae, model, args, device):
    """Latent CFG sweep (calm.CALM.step_backbone): the descriptions of args.text_clips held-out
    clips (random attribute combinations, fixed seeds) are generated from nothing at each alpha
    (batch of all descriptions, same seed per alpha), decoded, and scored by the detectors; fd
    against the real clips of a disjoint held-out set. 'real' = the detectors on the described clips
    themselves (their ceiling), 'chance' = uniform guessing (5 families, 2 modes, 3 equally wide
    tempo classes). ms_frame: batch 1, 1 head step, best of 2: guided = two T_long passes
    (conditional + null) + T_short + one head call per frame."""
    if not getattr(model.cfg, 'n_text', 0):
        return {'skipped': 'unconditional model (n_text = 0)'}
    n, sr = args.text_clips, data.SR
    clips = data.toy_clips('heldout', 2 * n, seconds=args.text_seconds)
    clips, ref = clips[:n], clips[n:]
    metas = [c.meta for c in clips]
    text = calm.pad_text([data.tokenize(data.description(m)) for m in metas], model.cfg.n_text)
    detector = metrics.TimbreDetector(data.toy_clips('train', args.timbre_fit))
    ref_emb = metrics.embed([c.wav for c in ref], sr)
    frames = int(round(args.text_seconds * vae.frame_rate))
    fd = lambda wavs: metrics.frechet(metrics.embed(wavs, sr), ref_emb)
    rows = {'real': {**text_adherence([c.wav for c in clips], metas, detector),
                     'fd': fd([c.wav for c in clips])},
            'chance': {'timbre': 1 / 5, 'mode': 1 / 2, 'tempo': 1 / 3}}

    def ms_frame(**kw):
        best = float('inf')
        for _ in range(2):
            t = time.perf_counter()
            model.generate(None, frames, generator=torch.Generator(device=device).manual_seed(0),
                           **temp_kwargs(args.temperature[0]), **kw)
            best = min(best, 1000 * (time.perf_counter() - t) / frames)
        return best
    one = text[:1].to(device)
    speed = {'guided': ms_frame(text=one, guidance=2.0), 'unguided': ms_frame(text=one),
             'no text': ms_frame()}
    for a in args.guidance_sweep:
        g = torch.Generator(device=device).manual_seed(args.seed)
        lat = model.generate(None, frames, generator=g, text=text.to(device), guidance=a,
                             **temp_kwargs(args.temperature[0]))
        wavs = list(vae.decode(lat).float().cpu().numpy())
        rows[f'alpha={a:g}'] = {**text_adherence(wavs, metas, detector), 'fd': fd(wavs),
                                'ms_frame': speed['guided']}
        print(f'[text] alpha={a:g} done', file=sys.stderr, flush=True)
    rows['unguided (= alpha 1)'] = {'ms_frame': speed['unguided']}
    rows['no text (= alpha 0)'] = {'ms_frame': speed['no text']}
    settings = dict(n_descriptions=n, seconds=args.text_seconds, seed=args.seed, steps=1,
                    temperature=tlabel(args.temperature[0]), timbre_fit=args.timbre_fit)
    return dict(settings=settings, rows=rows, speed_ms_per_frame=speed)


# --------------------------------------------------------------------------------------------------
# Printing

TEXT_COLS = ['timbre', 'mode', 'tempo', 'fd', 'ms_frame']
CONT_COLS = ['note_acc', 'note_acc_ci', 'onset_r', 'onset_p', 'onset_f1', 'key', 'key_ci',
             'timbre', 'timbre_ci', 'mel_db', 'fd']


def fmt(v):
    if isinstance(v, list):  # an interval
        return '[' + ', '.join(fmt(x) for x in v) + ']'
    return '-' if v is None else f'{v:.3f}' if isinstance(v, float) else str(v)


def table(rows, cols):
    """rows: {name: dict}; a fixed-width text table of the given columns."""
    names = list(rows)
    w0 = max([len('')] + [len(n) for n in names]) + 2
    w = [max(10, len(c) + 2, *(len(fmt(rows[n].get(c))) + 2 for n in names)) for c in cols]
    lines = [''.ljust(w0) + ''.join(c.rjust(k) for c, k in zip(cols, w))]
    for n in names:
        lines.append(n.ljust(w0) + ''.join(fmt(rows[n].get(c)).rjust(k) for c, k in zip(cols, w)))
    return '\n'.join(lines)


def report(res):
    out = []
    if 'vae' in res:
        out.append('== VAE reconstruction (held-out clips) ==\n'
                   + table({'vae': res['vae']}, list(res['vae'])))
    if 'timbre_detector' in res:
        det = res['timbre_detector']
        out.append(f"timbre detector accuracy on the real continuations: {fmt(det['acc_real'])} "
                   f"(families: {', '.join(det['families'])})")
    if 'continuation' in res:
        c = res['continuation']
        out.append('== Continuation == ' + json.dumps(c['settings']) + '\n'
                   + table(c['rows'], CONT_COLS) + "\nchance = 'other clip' (a different held-out "
                   "clip's true continuation); ceiling = 'real'\n*_ci: 95% per-clip bootstrap "
                   'intervals, the same resamples for every row')
    if 'text' in res:
        t = res['text']
        body = t['skipped'] if 'skipped' in t else (
            json.dumps(t['settings']) + '\n' + table(t['rows'], TEXT_COLS)
            + "\nceiling = 'real' (detectors on the described clips); 'chance' = uniform guessing; "
              'ms_frame: batch 1, 1 head step')
        out.append('== Text adherence and latent CFG == ' + body)
    if 'speed' in res:
        out.append('== Speed (batch 1) ==\n'
                   + '\n'.join(f'{k:28s} {fmt(v)}' for k, v in res['speed'].items()))
    return '\n\n'.join(out)


# --------------------------------------------------------------------------------------------------
# Equal-budget comparisons (the paper's ablations), trained by train.py

BASE = ['--head-loss', 'consistency']  # the paper's ablations are on the consistency head
VARIANTS = {
    'consistency': BASE,
    'trigflow': ['--head-loss', 'trigflow'],
    'no_noise_aug': BASE + ['--no-noise-aug'],
    # the toy has no short-context Transformer (calm.TOY): this ablation ADDS the paper's K = 10
    'short_context_10': BASE + ['--short-context', '10'],
    'head_batch_mul_1': BASE + ['--head-batch-mul', '1'],
}
SWEEP = [0.7, 0.0, 0.4, 1.0]  # temperatures for the default model when none are given


def compare_rows(results, temperatures):
    """One table from {variant: evaluate result}: per variant its calm rows at the first
    temperature, the whole temperature sweep on 'consistency'; plus the reference rows (real / vae /
    other clip) of the first."""
    rows = {}
    for name, res in results.items():
        for key, r in res['continuation']['rows'].items():
            if key.startswith('calm'):
                if name != 'consistency' and not key.endswith(f'T={tlabel(temperatures[0])}'):
                    continue  # the sweep only on the default model
                rows[f'{name} {key[5:]}'] = r
    first = next(iter(results.values()))['continuation']['rows']
    rows['(real)'], rows['(vae)'] = first['real'], first['vae']
    rows['(other clip)'] = first['other clip']
    return rows


def run_compare(args):
    if args.temperature == [None]:
        args.temperature = SWEEP
    results = {}
    for name, extra in VARIANTS.items():
        out = os.path.join(args.compare_dir, name)
        if not os.path.exists(os.path.join(out, 'calm.pt')) or args.retrain:
            cmd = [sys.executable, 'train.py', '--stage', 'lm', '--vae-from', args.vae_from,
                   '--out', out, '--lm-steps', str(args.lm_steps), '--seed', str(args.seed),
                   '--device', args.device] + extra
            print('[compare] ' + ' '.join(cmd), file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        a = argparse.Namespace(**vars(args))
        if name == 'trigflow':
            a.steps = [args.trigflow_steps]
        if name != 'consistency':
            a.temperature = args.temperature[:1]
        results[name] = evaluate(out, a, sections=('continuation',))
    rows = compare_rows(results, args.temperature)
    text = (f'== Equal budget comparison: {args.lm_steps} LM steps each, VAE from {args.vae_from} '
            '==\n' + table(rows, CONT_COLS))
    return dict(results=results, table=rows), text


# --------------------------------------------------------------------------------------------------
# Continuous vs discrete (the paper's comparison with the RQ-Transformer): one table of several runs

def run_vae_dir(run_dir):
    """The folder holding a run's VAE and its latent cache (itself, or the --vae-from folder in
    calm.pt)."""
    if os.path.isfile(os.path.join(run_dir, 'vae.pt')):
        return run_dir
    ck = torch.load(os.path.join(run_dir, 'calm.pt'), map_location='cpu', weights_only=False)
    return os.path.dirname(ck['vae'])


@torch.no_grad()
def eval_codec(vae, vae_dir, levels, V, clips, device, models=()):
    """Codec rows: the Gaussian latents as the VAE decodes them vs RVQ codes of them with Q in
    `levels`, V codewords per level, fitted on the run's cached latents exactly as train.py fits a
    discrete LM's (rq.fit, seed 0; a Q-level fit is the first Q levels of the deepest one). Bits per
    frame: Q log2 V for RVQ; for the Gaussian latents the KL of the posterior to the prior (the rate
    a bits-back / relative-entropy coder pays). lat_mse: squared error of the dequantised latents
    (standardised units; post_var: the posterior variance in the same units, the noise the decoder
    was trained to tolerate). models: the discrete LMs of the table, whose codebooks are compared
    with this fit."""
    Q = max(levels)
    # the RVQ fit settings (rq.Config's rvq_* fields) of the first discrete LM with this V, else
    # the defaults
    like = next((m.cfg for _, m in models if m.cfg.codebook_size == V), rq.Config())
    cfg = dataclasses.replace(like, latent_dim=vae.cfg.latent_dim, n_q=Q, codebook_size=V)
    rvq = rq.RVQ(cfg.latent_dim, Q, V, cfg.rvq_decay, cfg.rvq_dead)
    # train.py's cache, in memory
    latents = [corpus.LatentCache(os.path.join(vae_dir, 'latents')).frames()]
    t0 = time.time()
    rq.fit(rvq, torch.cat(latents), cfg, seed=0,
           log=lambda m: print(f'[codec] {m}', file=sys.stderr, flush=True))
    fit_s = time.time() - t0
    rvq = rvq.to(device)
    wav = torch.tensor(np.stack([c.wav for c in clips]), device=device)
    mu, logvar = vae.posterior(wav)
    z = (mu - vae.latent_mean) / vae.latent_std
    kl_bits = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1).mean() / math.log(2)
    rows = {'gaussian (VAE)': {**eval_vae(vae, clips, device, name='codec gaussian'),
                               'bits': float(kl_bits), 'lat_mse': 0.0,
                               'post_var': float((logvar.exp() / vae.latent_std ** 2).mean())}}
    for q in sorted(levels):
        deq = lambda x, q=q: rvq.decode(rvq.encode(x)[..., :q])
        scores = eval_vae(vae, clips, device, quantise=deq, name=f'codec Q={q}')
        rows[f'rvq Q={q} V={V}'] = {**scores, 'bits': q * math.log2(V),
                                    'lat_mse': float(((deq(z) - z) ** 2).mean())}
    levels_stats = rq.code_stats(rvq.encode(z), V)
    # the discrete LMs' own codebooks (fitted in train.py with their --seed) against this fit
    same = {name: float((m.rvq.codebooks - rvq.codebooks[:m.cfg.n_q]).abs().max())
            for name, m in models if m.cfg.codebook_size == V and m.cfg.n_q <= Q}
    return dict(rows=rows, levels=levels_stats, fit_seconds=fit_s,
                n_fit_frames=sum(len(x) for x in latents), lm_codebooks_max_abs_diff=same)


def count_flops(fn):
    """(fn(), its FLOPs): torch.utils.flop_counter's count (2 per multiply-add of the matmuls,
    convolutions and attention; elementwise work is not counted). CPU runs attention through a
    fused kernel the counter does not know: it is counted with the counter's own attention
    formula (sdpa_flop_count), as on a GPU."""
    def cpu_attention(q, k, v, *args, out_shape=None, **kw):
        return flop_counter.sdpa_flop_count(q, k, v)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with flop_counter.FlopCounterMode(display=False, custom_mapping={op: cpu_attention}) as fc:
        out = fn()
    return out, fc.get_total_flops()


def timed(fn, device='cpu'):
    """(fn(), its wall-clock seconds), the device synchronised before and after."""
    sync = torch.cuda.synchronize if str(device).startswith('cuda') else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


@torch.inference_mode()
def generation_parts(model, n, steps, temperature, meter, seed=0):
    """Generate n frames from nothing at batch 1 (model.generate itself: CALM's, the
    RQ-Transformer's or the delay LM's loop) with every step_backbone and sample_head call
    metered inside it: meter(fn) -> (fn(), amount), e.g. timed or count_flops. Returns per frame
    the amounts of the backbone steps, the head calls and the whole generate, and the calls per
    frame (the delay LM takes n + Q - 1 steps for n frames)."""
    total = {'backbone': 0.0, 'head': 0.0, 'backbone_calls': 0, 'head_calls': 0}

    def wrap(part, fn):
        def metered(*a, **kw):
            out, amount = meter(lambda: fn(*a, **kw))
            total[part] += amount
            total[part + '_calls'] += 1
            return out
        return metered
    # instance attributes shadow the methods generate calls through self
    model.step_backbone = wrap('backbone', model.step_backbone)
    model.sample_head = wrap('head', model.sample_head)
    try:
        g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        total['frame'] = meter(lambda: model.generate(None, n, steps=steps, generator=g,
                                                      temperature=temperature))[1]
    finally:
        del model.step_backbone, model.sample_head
    return {k: v / n for k, v in total.items()}


def time_parts(model, n, steps=1, temperature=0.8, device='cpu'):
    """Batch-1 cost per frame of an n-frame generation from nothing, measured two ways inside the
    real generation loop (generation_parts): milliseconds of the backbone steps, the head calls
    (CALM: `steps` head calls; RQ-Transformer: its Q depth steps; delay LM: its Q linear heads)
    and the whole frame, whose remainder other_ms is the loop's own work (stacking, dequantising,
    the delay pattern's bookkeeping); and the FLOPs of the same parts (count_flops), which do not
    depend on the machine or its load."""
    generation_parts(model, min(n, 4), steps, temperature, lambda fn: timed(fn, device))  # warm-up
    ms = generation_parts(model, n, steps, temperature, lambda fn: timed(fn, device))
    grads = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)   # the counter's module tracker would hook parameters' views
    try:
        fl = generation_parts(model, n, steps, temperature, count_flops)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    out = {f'{k}_ms': 1000 * ms[k] for k in ('backbone', 'head', 'frame')}
    out['other_ms'] = out['frame_ms'] - out['backbone_ms'] - out['head_ms']
    out.update({f'{k}_mflop': fl[k] / 1e6 for k in ('backbone', 'head', 'frame')})
    out.update(backbone_calls=ms['backbone_calls'], head_calls=ms['head_calls'])
    return out


def table_speed(entries, sweep_cfg, args, frame_rate, device):
    """entries: {name: (model, steps, temperature)}; the first CALM entry is the reference. Every
    row generates the same args.speed_seconds from nothing (time_parts: ms and FLOPs per frame,
    the parts timed inside the generation loop); each row is the round whose whole frame was
    fastest of args.speed_rounds rounds, the models interleaved within a round (a shared machine
    slows them alike), so its parts add up to its frame. Adds the RQ-Transformer and delay LM at
    each Q of args.codec_levels, untrained (cost does not depend on the weights). head_x /
    whole_x: cost relative to the reference (the paper's 12.3x and 1.3x), in ms and in FLOPs; h:
    the head's share of backbone + head."""
    n = int(round(args.speed_seconds * frame_rate))
    jobs = dict(entries)
    for q in args.codec_levels:
        for kind in ('rq', 'delay'):
            cfg = dataclasses.replace(sweep_cfg, kind=kind, n_q=q, codebook_size=args.codebook_size)
            jobs[f'{kind} Q={q} (untrained)'] = (rq.build(cfg).to(device).eval(), 1, 0.8)
    best = {}
    for r in range(args.speed_rounds):
        for name, (m, s, t) in jobs.items():
            parts = time_parts(m, n, s, t, device)
            if parts['frame_ms'] < best.get(name, {}).get('frame_ms', math.inf):
                best[name] = parts
        print(f'[speed] round {r + 1}/{args.speed_rounds} done', file=sys.stderr, flush=True)
    ref = best[next(k for k, (m, s, t) in entries.items() if m.multistep)]
    for b in best.values():
        b.update(h=b['head_ms'] / (b['head_ms'] + b['backbone_ms']),
                 head_x=b['head_ms'] / ref['head_ms'], whole_x=b['frame_ms'] / ref['frame_ms'],
                 head_flop_x=b['head_mflop'] / ref['head_mflop'],
                 whole_flop_x=b['frame_mflop'] / ref['frame_mflop'])
    return dict(rows=best, seconds=args.speed_seconds, rounds=args.speed_rounds,
                threads=torch.get_num_threads())


def run_stats(run_dir, model):
    """Parameters and the LM's training budget and time, from the checkpoint and log.jsonl."""
    ck = torch.load(os.path.join(run_dir, 'calm.pt'), map_location='cpu', weights_only=False)
    log = os.path.join(run_dir, 'log.jsonl')
    recs = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    lm = [r for r in recs if r.get('stage') == 'lm' and 'steps_per_s' in r]
    secs = sum((b['step'] - a['step']) / b['steps_per_s'] for a, b in zip([{'step': 0}] + lm, lm))
    return {'kind': ck.get('kind', 'calm'), 'params_M': calm.n_params(model) / 1e6,
            'head_params_M': calm.n_params(model.head) / 1e6, 'steps': ck['step'],
            'batch': ck['recipe']['batch'], 'lm_minutes': secs / 60 if lm else None}


def run_table(args):
    device, runs = args.device, {}
    for d in args.table:
        runs[os.path.basename(os.path.normpath(d))] = (d, *pipeline.load(d, device, args.around))
    if len(runs) < len(args.table):
        raise SystemExit('error: --table: give run folders with distinct names')
    res = {'runs': {name: run_stats(d, m) for name, (d, v, m) in runs.items()}}
    vae0 = next(iter(runs.values()))[1]
    discrete = [(n, m) for n, (d, v, m) in runs.items() if isinstance(m, rq.DiscreteLM)]
    held = data.toy_clips('heldout', args.clips)
    # the "codec-free" control: an RVQ fitted on the first Gaussian VAE's latents
    gauss = next(((d, v) for d, v, m in runs.values() if v.rvq is None), None)
    res['codec'] = (eval_codec(gauss[1], run_vae_dir(gauss[0]), args.codec_levels,
                               args.codebook_size, held, device, discrete) if gauss
                    else {'rows': {}})
    seen = set()   # codecs trained end to end: their own round trip, once per codec
    for name, (d, v, m) in runs.items():
        vae_dir = run_vae_dir(d) if v.rvq is not None else None
        if vae_dir and vae_dir not in seen:
            seen.add(vae_dir)
            q, k = v.cfg.rvq_levels, v.cfg.rvq_codebook
            res['codec']['rows'][f'{name}: end-to-end rvq Q={q} K={k}'] = {
                **eval_vae(v, held, device, name=f'codec {name}'), 'bits': q * math.log2(k)}
    n = args.clips_cont
    seconds = (args.prompt_seconds or 11.0) + args.continue_seconds + 0.5
    clips = data.toy_clips('heldout', 2 * n, seconds=seconds)
    detector = metrics.TimbreDetector(data.toy_clips('train', args.timbre_fit))
    rows, refs, entries = {}, None, {}
    reference = ('real', 'vae', 'other clip', 'noise')
    for name, (d, vae, model) in runs.items():
        a = argparse.Namespace(**vars(args))
        if model.multistep:
            a.steps = [args.trigflow_steps] if model.cfg.head_loss == 'trigflow' else args.steps
            entries.update({f'{name} calm steps={s}': (model, s, 0.8 if t is None else t)
                            for s in a.steps[:2] for t in args.temperature[:1]})
        else:
            a.temperature = args.discrete_temperatures
            entries[f'{name} {model.kind}'] = (model, 1, args.discrete_temperatures[0])
        c = eval_continuation(vae, model, clips[:n], clips[n:], detector, a, device)
        refs = refs or {f'({k})': r for k, r in c['rows'].items() if k in reference}
        rows.update({f'{name} {k}': r for k, r in c['rows'].items() if k not in reference})
        settings = c['settings']
    res['continuation'] = dict(settings=settings, rows={**rows, **refs})
    if not args.skip_speed:
        calm_cfg = next((m.cfg for _, (d, v, m) in runs.items() if m.multistep), None)
        if calm_cfg is None:
            raise SystemExit('error: --table: the speed section compares against a CALM run; add '
                             'one or --skip-speed')
        res['speed'] = table_speed(entries, rq.config_like(calm_cfg), args, vae0.frame_rate, device)
    return res, report_table(res)


def report_table(res):
    c, out = res['codec'], []
    cols = ['kind', 'params_M', 'head_params_M', 'steps', 'batch', 'lm_minutes']
    out.append('== Runs ==\n' + table(res['runs'], cols))
    snr = lambda r: (-10 * math.log10(r['post_var'] if 'post_var' in r
                                      else max(r['lat_mse'], 1e-12)) if 'lat_mse' in r else None)
    codec = {k: {**r, 'snr_db': snr(r)} for k, r in c['rows'].items()}
    n = next(iter(codec.values()))['n_clips']
    fit = (f"; RVQ fitted on {c['n_fit_frames']} cached frames in {c['fit_seconds']:.0f} s"
           if 'levels' in c else '')
    what = 'Gaussian latents vs RVQ' if 'levels' in c else 'end-to-end RVQ codecs'
    out.append(f"== Codec: {what} ({n} held-out clips{fit}) ==\n"
               + table(codec, ['bits', 'note_acc', 'log_mel_l1', 'snr_db', 'note_acc_real'])
               + '\nbits: per frame (Gaussian: KL to the prior); snr_db: latent variance / squared '
                 'quantisation error (Gaussian: / posterior variance, the noise the decoder was '
                 'trained on); end-to-end rows: the codec\'s own round trip')
    if 'levels' in c:
        out[-1] += ('\nper level (held-out): entropy bits '
                    + ' '.join(f"{s['entropy_bits']:.2f}" for s in c['levels'])
                    + ' | usage ' + ' '.join(f"{s['usage']:.2f}" for s in c['levels'])
                    + "\nthe discrete LMs' codebooks vs this fit, max abs diff: "
                    + str(c['lm_codebooks_max_abs_diff']))
    cont = res['continuation']
    out.append('== Continuation == ' + json.dumps(cont['settings']) + '\n'
               + table(cont['rows'], CONT_COLS))
    if 'speed' in res:
        s = res['speed']
        out.append(f"== Cost per frame, batch 1 ({s['seconds']:g} s generated from nothing by "
                   f"every row; the fastest of {s['rounds']} rounds; {s['threads']} threads) ==\n"
                   + table(s['rows'], ['backbone_ms', 'head_ms', 'other_ms', 'frame_ms', 'h',
                                       'head_x', 'whole_x'])
                   + '\n' + table(s['rows'], ['backbone_mflop', 'head_mflop', 'frame_mflop',
                                              'head_flop_x', 'whole_flop_x'])
                   + '\nms: the parts timed inside the generation loop (backbone + head + other = '
                     'frame); MFLOP: torch.utils.flop_counter (matmuls and attention, 2 per '
                     'multiply-add). head_x, whole_x: head and whole-generation cost relative to '
                     'the first CALM row (paper: RQ head 12.3x, 30 s generation 1.3x); h = head '
                     '/ (backbone + head)')
    return '\n\n'.join(out)


# --------------------------------------------------------------------------------------------------

def evaluate(run_dir, args, sections=('vae', 'continuation', 'speed')):
    device = args.device
    vae, model = pipeline.load(run_dir, device, getattr(args, 'around', None))
    res = {'run': run_dir}
    n_cont = args.clips_cont
    if 'vae' in sections:
        res['vae'] = eval_vae(vae, data.toy_clips('heldout', args.clips), device)
    # long enough for any prompt: two repetitions of the slowest motif take < 11 s
    seconds = (args.prompt_seconds or 11.0) + args.continue_seconds + 0.5
    clips = data.toy_clips('heldout', 2 * n_cont, seconds=seconds)
    if 'continuation' in sections:
        detector = metrics.TimbreDetector(data.toy_clips('train', args.timbre_fit))
        res['continuation'] = eval_continuation(vae, model, clips[:n_cont],
                                                clips[n_cont:2 * n_cont], detector, args, device)
        # the detector checked on real audio: its accuracy on the true continuations (row 'real')
        res['timbre_detector'] = dict(acc_real=res['continuation']['rows']['real']['timbre'],
                                      families=detector.families, n_fit=args.timbre_fit)
    if 'text' in sections and getattr(args, 'guidance_sweep', None):
        res['text'] = eval_text(vae, model, args, device)
    if 'speed' in sections and not args.skip_speed:
        # a discrete LM has no head steps to sweep; every LM: backbone, head (CALM: one call; a
        # discrete LM: all Q codes) and whole frame, timed and counted inside one generation
        res['speed'] = eval_speed(vae, model, clips[0], args, device) if model.multistep else {}
        temp = args.temperature[0]
        temp = model.cfg.temperature if temp is None else temp
        res['speed'].update(time_parts(model, int(round(10 * vae.frame_rate)), 1, temp, device))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default='out/toy', help='run folder with vae.pt and calm.pt')
    p.add_argument('--json', help='also write the results to this JSON file')
    p.add_argument('--clips', type=int, default=64, help='held-out clips for the VAE section')
    p.add_argument('--clips-cont', type=int, default=128,
                   help='held-out clips for the continuation section (32 for a quick look)')
    p.add_argument('--steps', default='1,4',
                   help='comma list of sampler steps for continuations (CALM runs; a discrete LM '
                        'samples each code once)')
    p.add_argument('--temperature', default='default',
                   help="comma list of temperatures; 'default': the model's")
    p.add_argument('--around', choices=['noise', 'mean'],
                   help="CALM runs: the temperature scales the head's noise (the paper's) or the "
                        "sample's spread around the readout's mean estimate (default: the run's)")
    p.add_argument('--prompt-seconds', type=float, default=None,
                   help='fixed prompt length (default: per clip, two repetitions of its motif)')
    p.add_argument('--continue-seconds', type=float, default=4.0)
    p.add_argument('--tol', type=float, default=0.1, help='onset tolerance (s) for onset_r/p/f1')
    p.add_argument('--timbre-fit', type=int, default=48,
                   help='train clips used to fit the timbre detector')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--skip-vae', action='store_true')
    p.add_argument('--skip-continuation', action='store_true')
    p.add_argument('--skip-speed', action='store_true')
    p.add_argument('--guidance-sweep', help='comma list of CFG alphas, e.g. 0,1,2,3: adds the text-'
                   'adherence section (text-conditioned runs; generate each description from '
                   'nothing at each alpha)')
    p.add_argument('--text-clips', type=int, default=16,
                   help='--guidance-sweep: held-out descriptions (default 16)')
    p.add_argument('--text-seconds', type=float, default=6.0,
                   help='--guidance-sweep: seconds per generated clip')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    p.add_argument('--compare', action='store_true',
                   help='train (train.py) and evaluate the ablation variants')
    p.add_argument('--compare-dir', default='out/compare')
    p.add_argument('--vae-from', default='out/toy',
                   help='--compare: run folder whose VAE every variant reuses')
    p.add_argument('--lm-steps', type=int, default=2000,
                   help='--compare: LM steps for every variant')
    p.add_argument('--trigflow-steps', type=int, default=100,
                   help='--compare, --table: sampler steps of a TrigFlow run')
    p.add_argument('--retrain', action='store_true',
                   help='--compare: retrain runs that already exist')
    p.add_argument('--table', nargs='+', metavar='RUN',
                   help='continuous vs discrete: one table of these run folders (codec rows, '
                        'continuations, speed); CALM runs at --steps (TrigFlow runs at '
                        '--trigflow-steps), discrete runs at --discrete-temperatures')
    p.add_argument('--discrete-temperatures', default='0.8,1.0',
                   help='--table: softmax temperatures of discrete runs')
    p.add_argument('--codec-levels', default='2,4,8,16',
                   help='--table: RVQ level counts Q of the codec and speed rows')
    p.add_argument('--codebook-size', type=int, default=256,
                   help='--table: codewords per level V of the codec rows')
    p.add_argument('--speed-seconds', type=float, default=30.0,
                   help='--table: seconds every speed row generates from nothing')
    p.add_argument('--speed-rounds', type=int, default=2, help='--table: speed rounds (best of)')
    args = p.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(',')]
    args.temperature = [None if t == 'default' else float(t) for t in args.temperature.split(',')]
    sweep = args.guidance_sweep
    args.guidance_sweep = [float(a) for a in sweep.split(',')] if sweep else None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # CPU: denormal floats slow long generations down many times
    args.discrete_temperatures = [float(t) for t in args.discrete_temperatures.split(',')]
    args.codec_levels = [int(q) for q in args.codec_levels.split(',')]
    if args.compare:
        res, text = run_compare(args)
    elif args.table:
        res, text = run_table(args)
    else:
        sections = [s for s in ('vae', 'continuation', 'speed') if not getattr(args, f'skip_{s}')]
        res = evaluate(args.ckpt, args, sections + ['text'])
        text = report(res)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        data.write_json(args.json, res, indent=1)
    return res


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:   # bad input (no or a wrong checkpoint): one line
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
