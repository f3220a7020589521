"""
Benchmark (not a test) of `train.py --data DIR` at scale: does the memory of training stay flat as
the corpus grows? For each size it writes a folder of audio files (toy melodies, data.make_clip, as
wav and flac at 16-48 kHz, mono and stereo, nested speaker/chapter folders, 4-40 s files plus one
20-minute file), then reports:

  index     time to scan the folder and read every header (fresh), and again from the cached index
  loader    VAE crops/s read by corpus.CropLoader (batches of 16 x 1 s, with 0 and 2 workers)
  encode    the LM stage's one-time encoding of the whole corpus, in x real time
  peak RSS  of `train.py --data` running a few VAE steps, the encoding plus a few LM steps, and a
            few LM steps from the finished cache, each in a fresh process (max RSS of the process
            and its workers)

    python -m bench.scale                                # 1 h and 10 h under out/bench
    OMP_NUM_THREADS=1 python -m bench.scale --hours 1 10 --root out/bench --delete
    OMP_NUM_THREADS=1 python -m bench.scale --toy-encode # the toy's cache vs a plain encoding loop

The models are the toy preset (the toy VAE encodes; 10 h take ~5 min on one CPU core). Timings
measured while other jobs share the machine are inflated; the RSS figures are not.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import soundfile as sf
import soxr
import torch

import corpus
import data
import vae as vae_lib

RATES = (16000, 22050, 24000, 44100, 48000)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # train.py's folder


def generate(root, hours, seed=0):
    """A nested folder of ~`hours` of audio; returns (files, seconds). Rebuilt only if absent or
    incomplete."""
    marker = os.path.join(root, '.complete')
    if os.path.exists(marker):
        return tuple(json.load(open(marker)))
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    # 8 s each
    pool = [data.make_clip(data.clip_seed('train', i)).wav.astype(np.float64) for i in range(24)]
    resample = lambda c, r: soxr.resample(c, data.SR, r) if r != data.SR else c
    pools = {r: [resample(c, r).astype(np.float32) for c in pool] for r in RATES}
    durations = [20 * 60.0]  # one long file: encoded in chunks
    while sum(durations) < hours * 3600:
        durations.append(float(rng.uniform(4, 40)))
    for k, secs in enumerate(durations):
        rate, ch = int(rng.choice(RATES)), int(rng.integers(1, 3))
        ext = 'flac' if rng.random() < 0.4 else 'wav'
        path = os.path.join(root, f'spk{k % 40:03d}', f'ch{k // 40 % 5:02d}', f'utt{k:05d}.{ext}')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        left = int(secs * rate)
        with sf.SoundFile(path, 'w', rate, ch, subtype='PCM_16') as f:
            while left > 0:  # written clip by clip: the generator's memory does not grow with a
                             # file
                a, b = rng.integers(len(pool), size=2)
                block = pools[rate][a][:left] * rng.uniform(0.5, 1.0)
                if ch == 2:
                    block = np.stack([block, 0.8 * pools[rate][b][:len(block)]], 1)
                f.write(block)
                left -= len(block)
    with open(marker, 'w') as f:
        json.dump([len(durations), sum(durations)], f)
    return len(durations), sum(durations)


def loader_rate(index, workers, steps=30):
    load = corpus.CropLoader(corpus.CropDataset(index, 0, 16, data.SR, data.SR), workers)
    load(0)  # start the workers
    t = time.time()
    for s in range(1, steps + 1):
        load(s)
    return 16 * steps / (time.time() - t)


def run_train(args, tag):
    """Run train.py in a fresh process; return (its output, wall seconds, peak RSS in MiB of it and
    its workers)."""
    t = time.time()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), *args], cwd=ROOT,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f'error: train.py ({tag}) failed:\n{out[-3000:]}')
    return out, time.time() - t, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def bench(root, hours, steps, workers):
    folder, run = os.path.join(root, f'{hours:g}h'), os.path.join(root, f'run_{hours:g}h')
    t = time.time()
    files, seconds = generate(folder, hours)
    r = {'hours': seconds / 3600, 'files': files, 'generate_s': time.time() - t,
         'bytes': sum(os.path.getsize(os.path.join(d, f))
                      for d, _, fs in os.walk(folder) for f in fs)}
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    cache = os.path.join(run, 'index.json')
    t = time.time()
    index = corpus.build_index(folder, cache, verbose=False)
    r['index_s'] = time.time() - t
    t = time.time()
    corpus.build_index(folder, cache, verbose=False)
    r['index_cached_s'] = time.time() - t
    r['crops_per_s_w0'] = loader_rate(index, 0)
    r['crops_per_s_w2'] = loader_rate(index, 2)
    common = ['--data', folder, '--out', run, '--workers', str(workers), '--log-every', str(steps),
              '--ckpt-every', '100000']
    _, r['vae_wall_s'], r['rss_vae_mib'] = run_train(
        [*common, '--stage', 'vae', '--vae-steps', str(steps)], 'vae')
    out, r['lm_encode_wall_s'], r['rss_lm_encode_mib'] = run_train(
        [*common, '--stage', 'lm', '--lm-steps', str(steps)], 'lm + encoding')
    rates = re.findall(r'(\d+)x real time', out)
    r['encode_x_realtime'] = float(rates[-1]) if rates else float('nan')
    _, r['lm_wall_s'], r['rss_lm_mib'] = run_train(
        [*common, '--stage', 'lm', '--lm-steps', str(steps)], 'lm')
    r['cache_mib'] = os.path.getsize(os.path.join(run, 'latents.npy')) / 2**20
    return r


def toy_encode(root, n=64, rounds=5):
    """Time to encode n toy clips (8 s each) with a fresh toy VAE, best of `rounds`, interleaved: a
    plain loop (vae.encode clip by clip into a list saved with torch.save, the in-memory cache this
    branch replaced) against corpus.encode_latents as train.py calls it for the toy (float32,
    unpadded), with and without its heap trim. Prints seconds, x real time and the ratio to the
    plain loop."""
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    vae = vae_lib.VAE(vae_lib.TOY).eval()
    wavs = [c.wav for c in data.toy_clips('train', n, 8.0)]
    os.makedirs(root, exist_ok=True)
    path, trim = os.path.join(root, 'toy_encode'), corpus.malloc_trim

    def plain():
        with torch.no_grad():
            torch.save([vae.encode(torch.from_numpy(w)[None])[0] for w in wavs], path + '.pt')

    def cache(trimmed):
        corpus.malloc_trim = trim if trimmed else (lambda pad: None)
        corpus.encode_latents(vae, [len(w) for w in wavs], lambda i, a, c: wavs[i][a:a + c], path,
                              bucket=1, verbose=False)
        for ext in ('.npy', '.json', '.done'):
            os.remove(path + ext)
    jobs = {'plain loop + torch.save': plain, 'corpus.encode_latents': lambda: cache(True),
            'corpus.encode_latents, no heap trim': lambda: cache(False)}
    best = {}
    for _ in range(rounds):
        for name, fn in jobs.items():
            t = time.time()
            fn()
            best[name] = min(best.get(name, math.inf), time.time() - t)
    corpus.malloc_trim = trim
    os.remove(path + '.pt')
    audio = sum(len(w) for w in wavs) / data.SR
    print(f'{n} toy clips ({audio / 60:.1f} min of audio), toy VAE, {torch.get_num_threads()} '
          f'thread(s), best of {rounds} interleaved rounds:')
    plain_s = best['plain loop + torch.save']
    for name, t in best.items():
        print(f'  {name}: {t:.2f} s, {audio / t:.0f}x real time, {t / plain_s:.2f}x the plain loop')


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--hours', type=float, nargs='+', default=[1, 10],
                   help='corpus sizes in hours (default: 1 10)')
    p.add_argument('--root', default='out/bench',
                   help='where corpora and runs are written (default out/bench)')
    p.add_argument('--steps', type=int, default=5,
                   help='VAE and LM steps per measured run (default 5)')

    p.add_argument('--workers', type=int, default=2,
                   help='--workers of the measured train.py runs (default 2)')
    p.add_argument('--delete', action='store_true',
                   help='delete each generated corpus once measured')
    p.add_argument('--toy-encode', action='store_true',
                   help='only time the toy latent cache against a plain encoding loop (64 clips; '
                        'no corpus)')
    args = p.parse_args()
    if args.toy_encode:
        return toy_encode(args.root)
    results = []
    for h in args.hours:
        print(f'--- {h:g} h', flush=True)
        r = bench(args.root, h, args.steps, args.workers)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.delete:
            shutil.rmtree(os.path.join(args.root, f'{h:g}h'))
    with open(os.path.join(args.root, 'bench.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print('\n| corpus | files | index (fresh / cached) | loader crops/s (0 / 2 workers) | encode | '
          'peak RSS: VAE steps | encode + LM steps | LM steps |')
    print('|---|---|---|---|---|---|---|---|')
    for r in results:
        print(f"| {r['hours']:.1f} h, {r['bytes'] / 2**30:.1f} GiB | {r['files']} | "
              f"{r['index_s']:.2f} s / {r['index_cached_s']:.2f} s | "
              f"{r['crops_per_s_w0']:.0f} / {r['crops_per_s_w2']:.0f} | "
              f"{r['encode_x_realtime']:.0f}x real time | {r['rss_vae_mib']:.0f} MiB | "
              f"{r['rss_lm_encode_mib']:.0f} MiB | {r['rss_lm_mib']:.0f} MiB |")
    if len(results) > 1:
        for key in ('rss_vae_mib', 'rss_lm_encode_mib', 'rss_lm_mib'):
            print(f'{key}: largest / smallest corpus = {results[-1][key] / results[0][key]:.3f}')


if __name__ == '__main__':
    main()
