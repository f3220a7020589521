"""
Measure the toy codec's decoders side by side (docs/codec.md): (a) the phase vocoder (the toy
default), (b) the learned-phase iSTFT head, (c) the learned-phase head trained with the
discriminator (VAE-GAN).

    python -m bench.codec score out/codec/a out/codec/b   # held-out reconstruction of trained VAEs
    python -m bench.codec score out/codec/b --vocoder     # (b)'s magnitudes, phase vocoder phases
    python -m bench.codec time                            # s per training step, a/b/c interleaved

`score` prints, per run folder, what evaluate.py's VAE section prints (note-pitch accuracy, log-mel
L1, SI-SDR, at zero lag) and log-mel L1 and SI-SDR with the decoder's fixed delay (vae.delay
samples) taken out: the spectral ends' output is the input delayed by n_fft - hop samples, so at
zero lag SI-SDR cannot see a phase that is right.
`time` builds the three variants with the toy recipe's batch (16 x 1 s) and times one training
step of each in turn (forward, discriminator update for (c), backward, optimizer), so a busy
machine slows all three alike; it prints the median and the ratio to (a).
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
import torch

import data
import metrics
import vae as vae_lib

# Each variant's vae.Config fields on the toy preset (train.py --vae.FIELD=VALUE)
VARIANTS = {
    'a': {},
    'b': {'phase': 'learned', 'freq_weight': 1.0},
    'c': {'phase': 'learned', 'freq_weight': 1.0, 'discriminator': True},
}
# The toy VAE recipe's batch (train.RECIPES['vae']): 16 crops of 1 s, at its lr
BATCH, CROP, LR = 16, 1.0, 2e-3


@torch.inference_mode()
def score(model, clips, batch=8):
    sr, d = data.SR, model.delay
    res = dict(note_acc=[], log_mel_l1=[], log_mel_l1_delay=[], si_sdr=[], si_sdr_delay=[])
    for i in range(0, len(clips), batch):
        chunk = clips[i:i + batch]
        x = torch.tensor(np.stack([c.wav for c in chunk]))
        y = model.decode(model.encode(x)).float().numpy()[:, :x.shape[1]]
        for c, rec in zip(chunk, y):
            res['note_acc'].append(metrics.note_pitch_accuracy(rec, c.notes, sr))
            res['log_mel_l1'].append(metrics.log_mel_l1(c.wav, rec, sr))
            ref = c.wav[:len(c.wav) - d]
            res['log_mel_l1_delay'].append(metrics.log_mel_l1(ref, rec[d:], sr))
            res['si_sdr'].append(metrics.si_sdr(c.wav, rec))
            res['si_sdr_delay'].append(metrics.si_sdr(ref, rec[d:]))
    return {k: float(np.mean(v)) for k, v in res.items()}


def time_steps(rounds, disc_channels):
    clips = [c.wav for c in data.toy_clips('train', 16, 2.0)]
    runs = {}
    for name, over in VARIANTS.items():
        cfg = dataclasses.replace(vae_lib.TOY, **over, disc_start=0.0, disc_channels=disc_channels)
        torch.manual_seed(0)
        model = vae_lib.VAE(cfg).train()
        adv = vae_lib.Adversary(cfg, 0, 'cpu', False) if cfg.discriminator else None
        # the VAE stage's AdamW (train.make_optimizer; the toy recipe has no weight decay)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.8, 0.99))
        runs[name] = (model, opt, adv, [])
    length = int(CROP * data.SR) // runs['a'][0].hop * runs['a'][0].hop
    for r in range(rounds + 1):
        batch = torch.from_numpy(data.crop_batch(clips, r, 0, BATCH, length))
        for name, (model, opt, adv, times) in runs.items():
            t = time.perf_counter()
            loss, stats = model(batch)
            if adv is not None:
                loss = loss + adv(r, 1, 1e-4, *model.last, stats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if r:  # round 0 warms up
                times.append(time.perf_counter() - t)
        print(f'round {r}/{rounds}', file=sys.stderr, flush=True)
    base = statistics.median(runs['a'][3])
    print(f'{"variant":<10} {"s/step":>8} {"x (a)":>7}   (median of {rounds}, batch {BATCH} x '
          f'{CROP:g} s, {torch.get_num_threads()} threads, discriminator channels {disc_channels})')
    for name, (*_, times) in runs.items():
        print(f'{name:<10} {statistics.median(times):8.3f} {statistics.median(times) / base:7.2f}')


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('what', choices=['score', 'time'])
    p.add_argument('runs', nargs='*', help='score: run folders holding a vae.pt')
    p.add_argument('--clips', type=int, default=64, help='score: held-out toy clips (default 64)')
    p.add_argument('--vocoder', action='store_true',
                   help="score: decode every run's magnitudes with the phase vocoder (a learned "
                        "head's run: what its magnitudes score without its phases)")
    p.add_argument('--rounds', type=int, default=10,
                   help='time: timed steps per variant (default 10)')
    p.add_argument('--disc-channels', type=int, default=vae_lib.Config.disc_channels,
                   help='time: channels of the discriminator of (c) (default '
                        f'{vae_lib.Config.disc_channels})')
    args = p.parse_args()
    torch.set_flush_denormal(True)
    if args.what == 'time':
        if args.runs or args.vocoder:
            p.error('time builds its own three variants: no run folders, no --vocoder')
        return time_steps(args.rounds, args.disc_channels)
    if not args.runs:
        p.error('score needs at least one run folder')
    for run in args.runs:
        if not os.path.exists(os.path.join(run, 'vae.pt')):
            raise SystemExit(f'error: no vae.pt in {run}')
    clips = data.toy_clips('heldout', args.clips)
    print(f'{"run":<28} {"phase":>8} {"GAN":>4} {"note_acc":>9} {"log_mel_l1":>11} {"(delay)":>8} '
          f'{"si_sdr":>8} {"(delay)":>8}   ({args.clips} held-out clips; (delay): with vae.delay '
          'taken out)')
    for run in args.runs:
        model, _ = vae_lib.load(os.path.join(run, 'vae.pt'))
        if args.vocoder:
            # spectral_out then returns no phase
            model.cfg = dataclasses.replace(model.cfg, phase='vocoder')
        r = score(model, clips)
        gan = 'yes' if model.cfg.discriminator else 'no'
        print(f'{run:<28} {model.cfg.phase:>8} {gan:>4} {r["note_acc"]:9.3f} '
              f'{r["log_mel_l1"]:11.3f} {r["log_mel_l1_delay"]:8.3f} {r["si_sdr"]:8.2f} '
              f'{r["si_sdr_delay"]:8.2f}', flush=True)


if __name__ == '__main__':
    main()
