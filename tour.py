"""
A guided tour of calm in pictures: what each part of a trained run does, one PNG per step. Read it
beside the code it draws (README.md, "How it works"); it imports only the library.

    pip install matplotlib              # optional dependency, only this script uses it
    python tour.py --ckpt out/toy       # -> out/toy/tour/01_data.png ... 06_training.png

Figures, in the order data flows (README.md, "How it works", walks through them):
  01_data         a held-out toy clip: waveform, log-mel spectrogram, its annotated notes
  02_vae          the clip through the VAE: original vs reconstruction, and the latent frames
  03_trigflow     TrigFlow noising of one latent frame; on a 1-D two-mode toy (mixture.py), the
                  exact PF-ODE paths, the TrigFlow sampler, the consistency map (= ODE endpoint),
                  the 1-step mean collapse, and the map an sCT head and an LSD head trained
                  alone learn
  04_temperature  one prompt continued at Gaussian temperatures 0, 0.5, 0.8, 1
  05_continuation prompt + continuation, and the transcribed notes against the clip's true ones
  06_training     the VAE and LM losses of the run (log.jsonl)
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import calm
import data
import metrics
import mixture
import pipeline

DPI = 60          # modest resolution: the six PNGs stay around 550 KB in all
N_MELS = 80       # metrics.log_mel's default
TEMPERATURES = (0.0, 0.5, 0.8, 1.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default='out/toy',
                   help='run folder with vae.pt, calm.pt, log.jsonl (default out/toy)')
    p.add_argument('--out', help='folder for the PNGs (default: <ckpt>/tour)')
    p.add_argument('--clip', type=int, default=0,
                   help='index of the held-out toy clip to show (default 0)')
    p.add_argument('--seconds', type=float, default=4.0,
                   help='seconds of continuation to generate (default 4)')
    p.add_argument('--seed', type=int, default=0, help='seed of the generation noise (default 0)')
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Helpers shared by the figures: a log-mel spectrogram on a time axis in seconds, with Hz ticks

def hz_to_mel_bin(f, sr):
    """Position of frequency f on metrics.log_mel's axis: its HTK mel filters have centres equally
    spaced in mel from 0 to sr/2, bin i at mel (i + 1) / (N_MELS + 1) * mel(sr/2)."""
    mel = lambda x: 2595.0 * np.log10(1.0 + np.asarray(x) / 700.0)
    return mel(f) / mel(sr / 2) * (N_MELS + 1) - 1


def show_mel(ax, wav, sr, t0=0.0, title=None, fmax=6000):
    """log-mel image of wav starting at time t0 (s); the y axis stops at fmax, where the toy's
    harmonics have faded, so the melody's region gets the space."""
    mel = metrics.log_mel(wav, sr)                        # [frames, mels], hop 256
    top = int(math.ceil(hz_to_mel_bin(fmax, sr)))
    # natural-log power: show the top 12 (~52 dB) so silence is black and every harmonic visible
    ax.imshow(mel[:, :top].T, origin='lower', aspect='auto', cmap='magma', vmin=mel.max() - 12,
              vmax=mel.max(), extent=(t0, t0 + len(mel) * 256 / sr, -0.5, top - 0.5))
    hz = [f for f in (100, 250, 500, 1000, 2000, 4000) if f < fmax]
    ax.set_yticks(hz_to_mel_bin(hz, sr), [f'{f:g}' for f in hz])
    ax.set_ylabel('Hz (mel scale)')
    if title:
        ax.set_title(title, fontsize=10)


def note_name(m):
    return ['C', 'C#', 'D', 'D#', 'E', 'F', 'F#', 'G', 'G#', 'A', 'A#',
            'B'][m % 12] + str(m // 12 - 1)


def piano_roll(ax, notes, color, label, alpha=0.8, height=0.8):
    for i, n in enumerate(notes):
        ax.broken_barh([(n.onset, n.duration)], (n.pitch - height / 2, height), color=color,
                       alpha=alpha, label=label if i == 0 else None)


def save(fig, path, written):
    fig.savefig(path, dpi=DPI)
    written.append(path)


def sampler_paths(n, steps, seed):
    """calm.trigflow_sample on the toy's exact F, recording the state it hands F at each grid time:
    times [steps+1], x [steps+1, n]. Row 0 is the sampler's own noise draw, so the other curves can
    start from the same noises."""
    seen = []
    def Fn(x, t):
        seen.append((t[0].item(), x[:, 0].clone()))
        return mixture.velocity(mixture.TWO_MODES, x, t).float()
    x0 = calm.trigflow_sample(Fn, (n, 1), steps, generator=torch.Generator().manual_seed(seed))
    times = np.array([t for t, _ in seen] + [0.0])
    return times, np.stack([x.numpy() for _, x in seen] + [x0[:, 0].numpy()])


# where TrigFlow in 1 step sends every noise
TWO_MODES_MEAN = (mixture.TWO_MODES[0] * mixture.TWO_MODES[1][:, 0]).sum().item()
HEAD_ITERS = 3000   # figure 03 (d): sCT steps of the head trained alone (as tests/test_calm.py's
                    # map test)
LSD_ITERS = 2000    # and the LSD head's (as the map test)


# --------------------------------------------------------------------------------------------------
# The figures, one function each, in the order the data flows. Each returns its matplotlib figure.

def fig_data(plt, clip, index):
    """01: a held-out toy clip: waveform, log-mel spectrogram with the annotated fundamentals, piano
    roll."""
    sr = data.SR
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True,
                                     height_ratios=[1, 2.2, 1.3])
    m = clip.meta
    fig.suptitle(f"01 data: held-out toy clip {index}: {m['family']}, "
                 f"{note_name(m['tonic'] + 60)[:-1]} {m['mode']}, {m['tempo']:.0f} BPM, a motif of "
                 f"{len(m['motif'])} notes repeated")
    a1.plot(np.arange(len(clip.wav)) / sr, clip.wav, lw=0.3, color='k')
    a1.set_ylabel('amplitude')
    a1.set_title('waveform (24 kHz)', fontsize=10)
    show_mel(a2, clip.wav, sr,
             title='log-mel spectrogram (metrics.log_mel); cyan: the annotated fundamental '
                                     'of each note, the bright lines above it are its harmonics')
    for n in clip.notes:
        a2.hlines(hz_to_mel_bin(data.midi_to_hz(n.pitch), sr), n.onset, n.onset + n.duration,
                  color='cyan', lw=1)
    piano_roll(a3, clip.notes, 'tab:cyan', None)
    for n in clip.notes:
        a3.text(n.onset + 0.02, n.pitch + 0.6, note_name(n.pitch), fontsize=7, va='bottom')
    a3.set_ylim(min(n.pitch for n in clip.notes) - 2, max(n.pitch for n in clip.notes) + 4)
    a3.set_ylabel('MIDI pitch')
    a3.set_title('the annotations clip.notes (onset, duration, MIDI pitch) as a piano roll',
                 fontsize=10)
    a3.set_xlabel('time (s)')
    fig.tight_layout()
    return fig


def fig_vae(plt, vae, clip):
    """02: the clip through the VAE: original vs reconstruction, and the latent frames. Returns
    (fig, latents)."""
    sr, fr = vae.cfg.sample_rate, vae.frame_rate
    wav = torch.from_numpy(clip.wav)[None]
    with torch.inference_mode():
        # [1, S, D], standardised posterior mean
        lat = vae.encode(wav)
        rec = vae.decode(lat)[0, :wav.shape[1]].numpy()
    acc = metrics.note_pitch_accuracy(rec, clip.notes, sr)
    fig, ax = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    fig.suptitle(f'02 VAE: {len(clip.wav) / sr:.0f} s of audio -> {lat.shape[1]} latent frames '
                 f'of {lat.shape[2]} dims ({fr:g} frames/s) -> audio')
    show_mel(ax[0], clip.wav, sr, title='original (log-mel)')
    show_mel(ax[1], rec, sr,
             title=f'reconstruction vae.decode(vae.encode(wav)): note-pitch accuracy {acc:.0%}, '
                                   f'log-mel L1 {metrics.log_mel_l1(clip.wav, rec, sr):.2f}')
    L = lat[0].numpy()
    im = ax[2].imshow(L.T, origin='lower', aspect='auto', cmap='RdBu_r', vmin=-3, vmax=3,
                      interpolation='nearest', extent=(0, L.shape[0] / fr, -0.5, L.shape[1] - 0.5))
    ax[2].set_title('latent frames x_1..x_S (vae.encode, standardised: what the language model '
                    'reads)', fontsize=10)
    ax[2].set_ylabel('latent dim')
    ax[2].set_xlabel('time (s)')
    fig.colorbar(im, ax=ax[2], location='right', fraction=0.02, pad=0.01)
    fig.tight_layout()
    return fig, lat


def fig_trigflow(plt, lat, seed):
    """03: (a) TrigFlow noising of one latent frame; (b, c) on the 1-D two-mode toy, the exact
    PF-ODE paths, the TrigFlow sampler, the consistency map (= ODE endpoint) and the 1-step mean
    collapse; (d) that map as a consistency (sCT) head and an LSD flow-map head trained alone on the
    toy learn it."""
    fig = plt.figure(figsize=(16, 8))
    gs = fig.add_gridspec(2, 4, width_ratios=[0.8, 3, 3, 3], height_ratios=[1, 1.4])
    fig.suptitle('03 TrigFlow: x_t = cos(t) x_0 + sin(t) z, data at t = 0, noise at t = pi/2; '
                 'the head learns to go back')
    # (a) one real latent frame noised along t
    T = 64
    t = torch.linspace(0, math.pi / 2, T)
    # a frame from the middle of the clip
    x0 = lat[0, lat.shape[1] // 2].expand(T, -1)
    z = torch.randn(x0.shape[1], generator=torch.Generator().manual_seed(seed)).expand(T, -1)
    xt, _ = calm.trigflow_interp(x0, z, t)
    ax = fig.add_subplot(gs[0, :])
    ax.imshow(xt.T.numpy(), origin='lower', aspect='auto', cmap='RdBu_r', vmin=-3, vmax=3,
              interpolation='nearest', extent=(0, math.pi / 2, -0.5, xt.shape[1] - 0.5))
    ax.set_title('(a) one latent frame x_0 of the clip noised by calm.trigflow_interp: every dim '
                 'slides from x_0 (left) to the noise z (right)', fontsize=10)
    ax.set_xlabel('t')
    ax.set_ylabel('latent dim')
    # (b) the 1-D two-mode toy, exact: ODE paths, sampler, consistency map, 1-step mean
    n_show = 14
    # row 0: the noises everything starts from
    ts8, x8 = sampler_paths(n_show, 8, seed)
    ts_ode, x_ode = mixture.ode_paths(mixture.TWO_MODES, x8[0][:, None])
    x_ode = x_ode[..., 0]
    ax_z = fig.add_subplot(gs[1, 0])
    ax = fig.add_subplot(gs[1, 1], sharey=ax_z)
    ax.plot(ts_ode, x_ode, color='tab:blue', lw=1, alpha=0.8)
    ax.plot(ts8, x8, 'o--', color='tab:orange', ms=3, lw=0.8, alpha=0.9)
    ax.plot(np.zeros(n_show), x_ode[-1], '*', color='tab:green', ms=10)
    ax.plot([0], [TWO_MODES_MEAN], 'X', color='tab:red', ms=10)
    ax.plot([], [], color='tab:blue', label='exact PF-ODE paths')
    ax.plot([], [], 'o--', color='tab:orange', ms=3, label='calm.trigflow_sample, 8 steps')
    ax.plot([], [], '*', color='tab:green', ms=10,
            label='consistency map f(z, pi/2) = ODE endpoint')
    ax.plot([], [], 'X', color='tab:red', ms=10, label='TrigFlow in 1 step: the mean, for every z')
    ax.set_xlim(math.pi / 2 + 0.05, -0.05)                           # time runs from noise to data
    ax.set_xlabel('t (reversed: sampling runs from noise at pi/2 to data at 0)')
    ax.legend(fontsize=7, loc='lower left')
    ax.set_title('(b) 1-D toy: 0.3 N(-1, 0.1^2) + 0.7 N(+1, 0.1^2), rescaled to std 1', fontsize=10)
    # (c) where 4000 noises land: histograms over x
    _, xs1 = sampler_paths(4000, 1, seed + 1)
    _, xs8 = sampler_paths(4000, 8, seed + 1)
    _, xe = mixture.ode_paths(mixture.TWO_MODES, xs1[0][:, None], 100)
    xe = xe[..., 0]
    grid = np.linspace(-2, 2, 400)
    ax = fig.add_subplot(gs[1, 2])
    bins = np.linspace(-2, 2, 81)
    ax.hist(xe[-1], bins, density=True, color='tab:green', alpha=0.5,
            label='consistency map (exact, 1 call)')
    ax.hist(xs8[-1], bins, density=True, histtype='step', color='tab:orange', lw=1.5,
            label='TrigFlow 8 steps')
    ax.axvline(TWO_MODES_MEAN, color='tab:red', lw=2, label='TrigFlow 1 step (all at the mean)')
    ax.plot(grid, mixture.density(mixture.TWO_MODES, grid), 'k', lw=1, label='data density')
    ax.set_xlabel('x_0')
    ax.set_ylabel('density')
    ax.legend(fontsize=7, loc='upper left')
    ax.set_title('(c) where 4000 noises land', fontsize=10)
    # where the paths start
    ax_z.hist(xs1[0], bins, density=True, orientation='horizontal', color='grey')
    ax_z.plot(np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), grid, 'k', lw=1)
    ax_z.invert_xaxis()
    ax_z.set_title('noise z ~ N(0, 1)', fontsize=10)
    ax_z.set_xlabel('density')
    ax_z.set_ylabel('x')
    # (d) the same map learnt: calm's head trained alone on the toy with the sCT loss, and with
    # LSD (a flow map), each sampled in one call
    x0_toy = lambda n: mixture.sample(mixture.TWO_MODES, n)
    m = mixture.train_head_alone('consistency', x0_toy, 1, HEAD_ITERS, seed=seed)
    m_lsd = mixture.train_head_alone('lsd', x0_toy, 1, LSD_ITERS, seed=seed)
    grid_T = torch.linspace(-2.5, 2.5, 201)[:, None]
    with torch.no_grad():
        z0, t_T = torch.zeros(len(grid_T), 8), torch.full((len(grid_T),), math.pi / 2)
        f1 = calm.consistency_fn(lambda x, t: m.head(x, t, z0), grid_T, t_T)
        x_lsd = calm.flow_map(lambda x, t, s: m_lsd.head(x, t, z0, s), grid_T, t_T, 0 * t_T)
    ax = fig.add_subplot(gs[1, 3])
    ax.plot(grid_T[:, 0], mixture.ode_paths(mixture.TWO_MODES, grid_T)[1][-1, :, 0],
            color='tab:green', lw=3, alpha=0.6, label='exact map: PF-ODE end point')
    ax.plot(grid_T[:, 0], x_lsd[:, 0], 'x', color='tab:orange', ms=4,
            label=f'LSD head, 1 jump X(pi/2 -> 0) ({LSD_ITERS} training steps)')
    ax.plot(grid_T[:, 0], f1[:, 0], '.', color='tab:purple', ms=3,
            label=f'sCT head, 1 step ({HEAD_ITERS} training steps)')
    ax.axhline(TWO_MODES_MEAN, color='tab:red', lw=1, ls=':', label='the mean')
    ax.set_xlabel('noise x_T')
    ax.set_ylabel('x_0 = f(x_T, pi/2)')
    ax.legend(fontsize=7, loc='upper left')
    ax.set_title('(d) the consistency map, exact vs learnt (sCT, LSD)', fontsize=10)
    fig.text(0.01, 0.005,
             'Nothing is trained in (b) and (c): F is the exact velocity E[v_t | x_t] of the toy. '
             "In (d) calm's head is trained alone on the toy (mixture.train_head_alone, "
             'CALM.objective: sCT or LSD) and must reproduce the green map in one call, keeping '
             'the order of the noises within each mode.',
             fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def fig_temperature(plt, vae, model, clip, n_new, seed):
    """04: one 4 s prompt continued at each Gaussian temperature of TEMPERATURES, same seed."""
    sr, fr = vae.cfg.sample_rate, vae.frame_rate
    p = min(round(4.0 * fr), len(clip.wav) // vae.hop)
    fig, ax = plt.subplots(len(TEMPERATURES), 1, figsize=(10, 2.2 * len(TEMPERATURES) + 0.6),
                           sharex=True)
    fig.suptitle(f'04 Gaussian temperature: the same {p / fr:.1f} s prompt and seed, '
                 f'{n_new / fr:.1f} s continued (model.generate, 1 consistency step)')
    for a, tau in zip(ax, TEMPERATURES):
        g = torch.Generator().manual_seed(seed)
        w = pipeline.continue_clip(vae, model, clip, p, n_new, 1, tau, g, 'cpu')
        what = ('head noise variance' if model.cfg.temperature_around == 'noise' else
                'spread around the mean estimate')
        show_mel(a, w, sr, title=f'temperature tau = {tau:g} ({what})')
        a.axvline(p / fr, color='w', ls='--', lw=1.5)
    ax[-1].set_xlabel('time (s); the dashed line is where generation starts')
    fig.tight_layout()
    return fig


def fig_continuation(plt, vae, model, clip, n_new, seed):
    """05: a two-motif prompt and its continuation; the transcribed notes against the clip's true
    ones."""
    sr, fr = vae.cfg.sample_rate, vae.frame_rate
    p = metrics.prompt_frames(clip, fr)                              # two motif repetitions
    t0, t1 = p / fr, (p + n_new) / fr
    g = torch.Generator().manual_seed(seed)
    w = pipeline.continue_clip(vae, model, clip, p, n_new, 1, None, g, 'cpu')
    gen = metrics.transcribe(w[p * vae.hop:], sr)
    for n in gen:
        n.onset += t0
    score = metrics.score_continuation(w, clip, t0, t1, sr)
    fig, ax = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True, height_ratios=[1, 1, 1.2])
    fig.suptitle(f'05 continuation: prompt = the first two motif repetitions ({t0:.1f} s), then '
                 f'{t1 - t0:.1f} s generated at the default temperature {model.cfg.temperature}')
    show_mel(ax[0], clip.wav[:int(t1 * sr)], sr,
             title='the real clip (what a perfect model would continue with)')
    show_mel(ax[1], w, sr, title='prompt (VAE reconstruction) + generated continuation')
    for a in ax:
        a.axvline(t0, color='w' if a is not ax[2] else 'k', ls='--', lw=1.5)
    piano_roll(ax[2], [n for n in clip.notes if n.onset < t0], 'lightgrey',
               'prompt notes (clip.notes)')
    piano_roll(ax[2], [n for n in clip.notes if t0 <= n.onset < t1], 'tab:green',
               'expected notes (clip.notes)')
    piano_roll(ax[2], gen, 'tab:red', 'transcribed from the generation (metrics.transcribe)',
               alpha=0.6, height=0.5)
    pitches = [n.pitch for n in clip.notes if n.onset < t1] + [n.pitch for n in gen]
    ax[2].set_ylim(min(pitches) - 2, max(pitches) + 6)   # room for the legend
    ax[2].set_xlim(0, t1)
    ax[2].yaxis.get_major_locator().set_params(integer=True)   # MIDI pitches are integers
    ax[2].set_ylabel('MIDI pitch')
    ax[2].set_xlabel('time (s)')
    ax[2].set_title(f"piano roll: {score['n_pitch']}/{score['n_ref']} expected notes at the right "
                    f"pitch, {score['n_hit']} matched in onset and pitch (+-0.1 s)", fontsize=10)
    ax[2].legend(fontsize=7, loc='upper left', ncol=3)
    fig.tight_layout()
    return fig


def fig_training(plt, ckpt):
    """06: the VAE and LM curves of the run's log.jsonl, with the LM's held-out val_mse."""
    log_path = os.path.join(ckpt, 'log.jsonl')
    recs = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    fig.suptitle("06 training: the run's log.jsonl (train.py)")
    labels = {'loss': 'loss (train)', 'spec': 'spectral loss (train)',
              'mse': "head-loss error (train; the sCT/TrigFlow target, not a frame error)"}
    for a, stage, keys in ((ax[0], 'vae', ('loss', 'spec')), (ax[1], 'lm', ('mse',))):
        train_recs = [r for r in recs
                      if r.get('stage') == stage and 'val_mse' not in r and 'step' in r]
        for k in keys:
            pts = [(r['step'], r[k]) for r in train_recs if k in r]
            if pts:
                a.plot(*zip(*pts), label=labels[k])
        val = [r for r in recs if r.get('stage') == stage and 'val_mse' in r]
        if val:   # the LM's held_out: teacher-forced, 1 step at temperature 0, held-out frames
            a.plot([r['step'] for r in val], [r['val_mse'] for r in val], 'o-', color='k', ms=4,
                   label='val_mse: held-out next-frame error (teacher-forced, tau 0)')
            a.plot([r['step'] for r in val], [r['val_var'] for r in val], '--', color='grey',
                   label='val_var: error of predicting the mean frame')
        a.set_xlabel('step')
        if stage == 'vae':
            a.set_title('VAE: loss = spectral loss + kl_weight * KL (log y)', fontsize=10)
            kl = [(r['step'], r['kl']) for r in train_recs if 'kl' in r]
            if kl:   # KL in nats per frame: another scale, a second axis
                a2 = a.twinx()
                a2.plot(*zip(*kl), color='tab:grey', lw=0.8, ls=':',
                        label='KL (nats/frame, right axis)')
                a2.set_ylabel('KL')
                a2.legend(fontsize=7, loc='upper center')
        else:
            a.set_title('LM: head loss and held-out next-frame error (log y)', fontsize=10)
        if a.lines:
            a.set_yscale('log')
            a.legend(fontsize=7, loc='best', framealpha=0.6)
        else:
            a.text(0.5, 0.5, f'no {stage} records in log.jsonl', ha='center', transform=a.transAxes)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:   # optional dependency: imported here so the rest of calm never needs it
        import matplotlib
        matplotlib.use('Agg')          # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print('error: tour.py needs matplotlib: pip install matplotlib', file=sys.stderr)
        return 1
    out = args.out or os.path.join(args.ckpt, 'tour')
    vae, model = pipeline.load(args.ckpt)
    os.makedirs(out, exist_ok=True)
    torch.set_flush_denormal(True)     # CPU: denormal floats made long generations ~20x slower per
                                       # frame
    n_new = max(1, round(args.seconds * vae.frame_rate))
    # one held-out clip, long enough for a two-motif prompt plus the continuation (as evaluate.py
    # does)
    clip = data.make_clip(data.clip_seed('heldout', args.clip), seconds=11.0 + args.seconds + 0.5)
    short = data.make_clip(data.clip_seed('heldout', args.clip))      # the same notes, cut at 8 s
    written = []

    print('[1/6] the toy data')
    save(fig_data(plt, short, args.clip), os.path.join(out, '01_data.png'), written)
    print('[2/6] the VAE')
    fig, lat = fig_vae(plt, vae, short)
    save(fig, os.path.join(out, '02_vae.png'), written)
    print(f'[3/6] TrigFlow and consistency (trains 1-D heads: sCT for {HEAD_ITERS} steps, LSD for '
          f'{LSD_ITERS}; a few minutes)')
    save(fig_trigflow(plt, lat, args.seed), os.path.join(out, '03_trigflow.png'), written)
    print('[4/6] temperature')
    save(fig_temperature(plt, vae, model, clip, n_new, args.seed),
         os.path.join(out, '04_temperature.png'), written)
    print('[5/6] continuation')
    save(fig_continuation(plt, vae, model, clip, n_new, args.seed),
         os.path.join(out, '05_continuation.png'), written)
    print('[6/6] training curves')
    save(fig_training(plt, args.ckpt), os.path.join(out, '06_training.png'), written)

    print('wrote:')
    for path in written:
        print(f'  {path} ({os.path.getsize(path) // 1024} KB)')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:   # e.g. no checkpoint: one clear line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
