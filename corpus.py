"""
Your own audio at scale: `train.py --data DIR` on hours of speech or music without loading it into
memory, and the latent cache and LM batches every run trains from. Read it when you train on your
own audio; for the toy, train.py's use of it is enough.

    index = build_index('my_audio/', 'out/mine/index.json')   # each file's length and rate
    get_batch = CropLoader(CropDataset(index, seed, batch, length, sr), workers=4)   # VAE stage
    latents = encode_latents(vae, lengths, read, 'out/mine/latents')   # LM stage: encoded once
    latents[i]                                  # file i's latents [frames, D], a memmap view
    x = window_batch(latents, step, seed, batch, length)   # LM stage: [batch, length, D]

1. The index: a recursive scan for the formats soundfile reads (wav, flac, ogg, mp3). Only headers
   are read; the result is cached in the run folder and only new or changed files are read again.
   A file that is empty or unreadable is skipped with one warning line; nothing stops the run.
2. VAE crops are read from disk with a seek, mixed to mono and resampled per crop (soxr), in
   DataLoader workers. The batch of step s is a pure function of (seed, step, rank), so `--resume`
   is exact.
3. The latent cache: <path>.npy, one [total frames, D] array (np.load(..., mmap_mode='r') reads it
   lazily), <path>.json (where each file starts, its length, and the key that says which VAE and
   files made it) and <path>.done (one byte per file, set once its latents are on disk: an
   interrupted encoding resumes). Long files are encoded in chunks, each with enough left context
   that a causal encoder gives the latents of one pass (the paper's VAE is causal, like Mimi), so
   memory does not grow with a file's length.
"""
import ctypes
import hashlib
import itertools
import json
import math
import os
import sys
import time

import numpy as np
import soundfile as sf
import soxr
import torch
import torch.distributed as dist

import calm
import data
import vae as vae_lib

AUDIO_EXTS = ('.wav', '.flac', '.ogg', '.mp3')


try:  # glibc: hand freed heap memory back to the OS (encode_sources)
    malloc_trim = ctypes.CDLL('libc.so.6').malloc_trim
except (OSError, AttributeError):  # another C library: nothing to do
    malloc_trim = lambda pad: None


def fmt_time(s):
    s = int(round(s))
    return f'{s // 3600}h{s // 60 % 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


# -----------------------------------------------------------------------------------------------
# 1. The file index

class Index:
    """The readable audio files under `root`: relative paths, lengths in frames and sample rates."""

    def __init__(self, root, paths, frames, rates):
        self.root, self.paths = root, list(paths)
        self.frames, self.rates = np.asarray(frames, np.int64), np.asarray(rates, np.int64)

    def __len__(self):
        return len(self.paths)

    def n_samples(self, sr):
        """Every file's length in samples at rate sr."""
        return self.frames * sr // self.rates

    def hours(self):
        return float((self.frames / self.rates).sum() / 3600)

    def read(self, i, start, n, sr):
        path = os.path.join(self.root, self.paths[i])
        return read_segment(path, int(self.rates[i]), start, n, sr)


def probe(path, size):
    """[frames, rate, reason]: the header alone; reason is '' for a usable file, else why it is
    skipped."""
    if size == 0:
        return [0, 0, 'empty file (0 bytes)']
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises several types; one line for all of them
        return [0, 0, 'unreadable: ' + (str(e).splitlines()[0] if str(e) else type(e).__name__)]
    if info.frames < max(1, info.samplerate // 100):
        return [0, 0, f'too short ({info.frames} samples, under 10 ms)']
    return [int(info.frames), int(info.samplerate), '']


def build_index(root, cache_path=None, verbose=True):
    """Index every wav/flac/ogg/mp3 under `root` (recursively, in sorted order; hidden files such as
    macOS's ._name are ignored). cache_path (a json file): entries whose size and modification time
    have not changed are reused, so a second run reads no header. Raises ValueError (one line) if
    root is not a folder."""
    if not os.path.isdir(root):
        raise ValueError(f'not a directory: {root}')
    root = os.path.abspath(root)
    found = []  # (relative path, size, mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(AUDIO_EXTS) and not name.startswith('.'):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:  # a broken link
                    continue
                found.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    old = {}
    if cache_path and os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                cached = json.load(f)
            if cached.get('root') == root:
                old = {e[0]: e for e in cached['files']}
        except (ValueError, KeyError, TypeError, OSError):
            old = {}  # a damaged cache is rebuilt
    stale = [f for f in found if f[0] not in old or old[f[0]][1:3] != [f[1], f[2]]]
    t0 = t_print = time.time()
    for k, (rel, size, mtime) in enumerate(stale):
        old[rel] = [rel, size, mtime, *probe(os.path.join(root, rel), size)]
        if verbose and (time.time() - t_print > 10 or k + 1 == len(stale)) and len(stale) > 1000:
            t_print, rate = time.time(), (k + 1) / (time.time() - t0)
            print(f'index: {k + 1}/{len(stale)} headers read | {rate:.0f} files/s | '
                  f'ETA {fmt_time((len(stale) - k - 1) / rate)}', flush=True)
    entries = [old[rel] for rel, _, _ in found]
    if cache_path and (stale or len(entries) != len(old) or not os.path.exists(cache_path)):
        data.write_json(cache_path, {'root': root, 'files': entries})
    good = [e for e in entries if not e[5]]
    bad = [e for e in entries if e[5]]
    index = Index(root, [e[0] for e in good], [e[3] for e in good], [e[4] for e in good])
    if verbose:
        for e in bad:
            print(f'warning: skipping {os.path.join(root, e[0])}: {e[5]}', flush=True)
        print(f'index: {len(index)} audio files, {index.hours():.2f} h under {root}'
              + (f' ({len(bad)} skipped, see the warnings above)' if bad else '')
              + f' | {len(stale)} headers read in {time.time() - t0:.1f} s', flush=True)
    return index


def shared_index(root, cache_path):
    """build_index for every process of a run: under DDP (torch.distributed initialised) rank 0
    builds it and prints the summary, the other ranks then read its cache (no header read twice)."""
    ddp = dist.is_available() and dist.is_initialized()
    if ddp and dist.get_rank() != 0:
        dist.barrier()
        return build_index(root, cache_path, verbose=False)
    try:
        return build_index(root, cache_path)
    finally:
        if ddp:
            dist.barrier()  # also on an error: the other ranks then fail on the same folder, not
                            # hang


def audio_index(root, cache_path):
    """shared_index of a --data folder, which must hold readable audio (else a one-line ValueError).
    """
    try:
        index = shared_index(root, cache_path)
    except ValueError as e:
        raise ValueError(f'--data: {e}') from None
    if not len(index):
        exts = '/'.join(e[1:] for e in AUDIO_EXTS)
        raise ValueError(f'no readable {exts} files under {root}')
    return index


def stats_audio(clips, sr, n=256, seconds=8.0):
    """The audio whose posterior means set the VAE's latent statistics (train.py): the first n toy
    clips (a list of arrays), or the first `seconds` of n files spread evenly over an Index, read
    one by one (not held together in memory). No padding, no random draw."""
    if not isinstance(clips, Index):
        return clips[:n]
    lengths = clips.n_samples(sr)
    picks = np.unique(np.linspace(0, len(clips) - 1, min(n, len(clips))).round().astype(int))
    return (clips.read(i, 0, int(min(lengths[i], seconds * sr)), sr) for i in picks)


# -----------------------------------------------------------------------------------------------
# 2. Lazy crops

_warned = set()


def read_segment(path, file_sr, start, n, sr):
    """n samples at rate sr starting at sample `start` (counted at sr) of an audio file: only that
    part is read (seek), mixed to mono, resampled with soxr and zero-padded past the end. A file
    that cannot be read gives silence and one warning line (once per file and process) rather than
    stopping a run."""
    out = np.zeros(n, np.float32)
    margin = 0 if file_sr == sr else file_sr // 100 + 16  # 10 ms each side: the resampler sees no
                                                          # false edge
    q = file_sr // math.gcd(file_sr, sr)  # start reading on a sample that falls on the output grid
                                          # too
    a = max(0, start * file_sr // sr - margin) // q * q
    b = -(-(start + n) * file_sr // sr) + margin
    try:
        with sf.SoundFile(path) as f:
            if a >= f.frames:
                return out
            f.seek(a)
            x = f.read(b - a, dtype='float32', always_2d=True).mean(axis=1)
    except Exception as e:
        if path not in _warned:
            _warned.add(path)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f'warning: cannot read {path} ({reason}); using silence', file=sys.stderr,
                  flush=True)
        return out
    if file_sr != sr and len(x):
        x = soxr.resample(x, file_sr, sr)
        x = x[start - a * sr // file_sr:]  # x[k] is at time a / file_sr + k / sr (a * sr / file_sr
                                           # is whole)
    x = x[:n]
    out[:len(x)] = x
    out[~np.isfinite(out)] = 0.0
    return out


class CropDataset(torch.utils.data.Dataset):
    """Item s = the batch of training step s: `batch` crops of `length` samples at rate sr. A file
    is drawn with probability proportional to its duration (every second of audio equally likely,
    however the corpus is cut into files), then a uniform start; a pure function of (seed, s, rank).
    """

    def __init__(self, index, seed, batch, length, sr, rank=0):
        if not len(index):
            raise ValueError('no audio files to crop from')
        self.index, self.seed, self.batch, self.length = index, seed, batch, length
        self.sr, self.rank = sr, rank
        self.n = index.n_samples(sr)
        self.cum = np.cumsum(self.n)

    def __getitem__(self, step):
        g = np.random.default_rng([self.seed, step, self.rank])
        out = np.zeros((self.batch, self.length), np.float32)
        for b in range(self.batch):
            i = int(np.searchsorted(self.cum, g.integers(self.cum[-1]), side='right'))
            start = int(g.integers(max(1, self.n[i] - self.length + 1)))
            out[b] = self.index.read(i, start, self.length, self.sr)
        return torch.from_numpy(out)


class CropLoader:
    """get_batch(step) for train.train(): DataLoader workers read the batches of the next steps
    ahead. Asking for another step than the next one (a resumed run) restarts the workers at that
    step; the batch of a step does not depend on the workers, it is dataset[step]."""

    def __init__(self, dataset, workers=4, pin_memory=False):
        self.dataset, self.workers, self.pin_memory = dataset, workers, pin_memory
        self.it, self.next = None, None

    def __call__(self, step):
        if self.it is None or step != self.next:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=itertools.count(step),
                num_workers=self.workers, pin_memory=self.pin_memory,
                prefetch_factor=4 if self.workers else None,
                # its own generator: a DataLoader draws a seed, which must not move the global RNG
                generator=torch.Generator())
            self.it = iter(loader)
        self.next = step + 1
        return next(self.it)


# -----------------------------------------------------------------------------------------------
# 3. The latent cache

def left_context_frames(vae):
    """Frames of past audio that latent frame s depends on (beyond its own): the receptive field of
    the causal encoder (STFT front end, convs, then the bottleneck Transformer's window per layer),
    plus one."""
    r, jump = 1, 1  # receptive field of the conv stack in its input steps, and the stride product
                    # so far
    for m in vae.encoder.modules():
        if isinstance(m, vae_lib.CausalConv1d):
            r += (m.kernel_size[0] - 1) * m.dilation[0] * jump
            jump *= m.stride[0]
    samples = r * max(vae.cfg.stft_hop, 1) + vae.n_fft  # n_fft = 0 without the STFT front end
    return math.ceil(samples / vae.hop) + vae.cfg.n_transformer_layers * (vae.cfg.context - 1) + 1


def encode_chunks(vae, read, n, device, chunk_frames, context_frames, bucket=1):
    """Latents of one source of n samples (read(start, count) -> float32 audio), chunk by chunk:
    each chunk of latent frames [f0, f1) is encoded from audio starting context_frames earlier and
    only its own frames are kept. A source of at most chunk_frames is one call of vae.encode on the
    whole of it. bucket > 1: each call's audio is zero-padded on the right to a multiple of `bucket`
    frames and the frames past the source are dropped (causal: the kept ones never see the padding).
    Sources of any length then make a bounded number of input shapes: every new shape costs memory
    that the conv backend (oneDNN) keeps and fragments the heap; measured, the process grew with the
    number of files encoded."""
    hop, S = vae.hop, vae.n_frames(n)
    for f0 in range(0, S, chunk_frames):
        f1, c0 = min(S, f0 + chunk_frames), max(0, f0 - context_frames)
        a, b = c0 * hop, min(n, f1 * hop)
        x = read(a, b - a)
        if bucket > 1:
            x = np.pad(x, (0, -(-(f1 - c0) // bucket) * bucket * hop - len(x)))
        yield vae.encode(torch.from_numpy(x)[None].to(device))[0, f0 - c0:f1 - c0]


def fingerprint(vae):
    """A hash of the VAE's weights and statistics: a cache made by another VAE is never reused."""
    h = hashlib.sha1()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """The cached latents, memory-mapped: cache[i] is source i's [frames_i, D] slice (a view:
    nothing is read until it is sliced). by_length: window_batch draws sources in proportion
    to their length."""

    def __init__(self, path, by_length=False):
        with open(path + '.json') as f:
            meta = json.load(f)
        self.names = meta['names']
        self.starts = np.asarray(meta['starts'], np.int64)
        self.lengths = np.asarray(meta['lengths'], np.int64)
        self.array = np.load(path + '.npy', mmap_mode='r')
        self.cum = np.cumsum(self.lengths) if by_length else None

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return self.array[self.starts[i]:self.starts[i] + self.lengths[i]]

    def frames(self):
        """Every cached frame, in source order, as one float32 [frames, D] tensor in memory (an RVQ
        fit)."""
        return torch.from_numpy(np.array(self.array, np.float32))


def encode_latents(vae, lengths, read, path, device='cpu', dtype=np.float32, names=None,
                   by_length=False, chunk_seconds=60.0, bucket=16, verbose=True, batch=1):
    """Encode every source once into the cache at `path` (.npy, .json, .done) and return it as a
    LatentCache.

    lengths[i]: source i's length in samples at the VAE's rate; read(i, start, count) -> float32
    audio. A complete cache with the same key (VAE weights, sources, dtype) is returned as it is; a
    partial one continues with the sources not yet marked done. chunk_seconds, bucket: see
    encode_chunks. Under DDP (torch.distributed initialised), rank r encodes sources r, r + world,
    ...; all ranks must call this. batch > 1: up to `batch` consecutive sources of one length that
    fit in one chunk are encoded in one vae.encode call (the toy's equal-length clips).
    """
    lengths = np.asarray(lengths, np.int64)
    names = list(names) if names is not None else [str(i) for i in range(len(lengths))]
    frames = -(-lengths // vae.hop)
    starts = np.concatenate([[0], np.cumsum(frames)[:-1]]).astype(np.int64)
    dim, dtype = vae.cfg.latent_dim, np.dtype(dtype)
    src = hashlib.sha1(json.dumps([names, lengths.tolist()]).encode()).hexdigest()
    key = {'vae': fingerprint(vae), 'sources': src, 'dtype': dtype.name, 'dim': dim, 'hop': vae.hop}
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    npy, meta_path, done_path = path + '.npy', path + '.json', path + '.done'
    if rank == 0:
        try:
            with open(meta_path) as f:
                same = json.load(f)['key'] == key
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        complete = os.path.exists(npy) and os.path.exists(done_path)
        if not (same and complete and os.path.getsize(done_path) == len(lengths)):
            # A new cache. The json is written last: it commits the layout (an interruption before
            # it leaves no json, so the next run starts over).
            if os.path.exists(meta_path):
                os.remove(meta_path)
            shape = (int(frames.sum()), dim)

            def sparse(tmp):   # a file of the final size: sources are written into it in place
                arr = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=shape)
                del arr

            def zeros(tmp):    # one byte per source, set once its latents are on disk
                with open(tmp, 'wb') as f:
                    f.write(bytes(len(lengths)))
            data.write_atomic(npy, sparse)
            data.write_atomic(done_path, zeros)
            data.write_json(meta_path, {'key': key, 'names': names, 'starts': starts.tolist(),
                                        'lengths': frames.tolist()})
    if ddp:
        dist.barrier()
    done = np.fromfile(done_path, np.uint8)
    todo = [i for i in range(rank, len(lengths), world) if not done[i]]
    if verbose and done.all():
        print(f'encode: reusing the complete latent cache {npy} ({len(lengths)} sources, '
              f'{frames.sum()} frames)')
    if todo:
        try:
            share = f' (rank {rank} of {world})' if ddp else ''
            encode_sources(vae, todo, lengths, read, npy, done_path, starts, dtype, device,
                           chunk_seconds, bucket, share, verbose, batch)
        except KeyboardInterrupt:
            if verbose:
                print('\nencode: interrupted; the sources done so far are kept, run the same '
                      'command to continue')
            raise SystemExit(130)
    if ddp:
        dist.barrier()
    if not np.fromfile(done_path, np.uint8).all():
        raise RuntimeError(f'latent cache {npy} is incomplete after encoding')
    return LatentCache(path, by_length)


def encode_index(vae, index, path, device='cpu', verbose=True):
    """encode_latents of every file of an Index at the VAE's rate: long files in chunks, cached as
    float16 (ample for standardised latents; half the disk and page cache), sources drawn by length.
    """
    sr = vae.cfg.sample_rate
    return encode_latents(vae, index.n_samples(sr), lambda i, a, c: index.read(i, a, c, sr), path,
                          device, np.float16, names=index.paths, by_length=True, verbose=verbose)


def encode_all(vae, clips, n, cache, device, rank=0, seconds=8.0, batch=32):
    """Encode the LM's training audio ONCE into the latent cache beside the VAE
    (encode_latents: a memory-mapped array on disk, resumable, each DDP rank encoding its share)
    and return it; the LM never re-encodes audio. Toy: n clips of `seconds`, rendered on the
    fly past the VAE's own (so the LM sees far more clips than the VAE trained on without holding
    their audio), cached as float32, `batch` clips per vae.encode call. --data: encode_index."""
    if isinstance(clips, Index):
        return encode_index(vae, clips, cache, device, verbose=rank == 0)
    length = int(round(seconds * data.SR))  # data.make_clip's length

    def read(i, start, count):   # toy clip i: one of the VAE's (of this length), or rendered now
        if i < len(clips) and len(clips[i]) == length:
            return clips[i][start:start + count]
        return data.make_clip(data.clip_seed('train', i), seconds).wav[start:start + count]
    # bucket=1: the clips all have one length (one input shape), and unpadded they keep their exact
    # values
    return encode_latents(vae, [length] * n, read, cache, device, np.float32, bucket=1, batch=batch,
                          names=[f'toy-train-{i}' for i in range(n)], verbose=rank == 0)


def encode_sources(vae, todo, lengths, read, npy, done_path, starts, dtype, device, chunk_seconds,
                   bucket, share, verbose, batch=1):
    """encode_latents' work: each source in `todo`, chunk by chunk, written in place, then marked
    done. batch > 1: runs of equal-length sources that fit in one chunk go through vae.encode
    together."""
    # offset: where the .npy header ends
    offset, dim = np.load(npy, mmap_mode='r').offset, vae.cfg.latent_dim
    ctx = left_context_frames(vae)
    chunk = -(-max(2 * ctx, round(chunk_seconds * vae.frame_rate)) // bucket) * bucket
    hours, secs = lengths[todo].sum() / vae.cfg.sample_rate / 3600, 0.0
    t0 = t_print = t_trim = time.time()
    if verbose:
        print(f'encode: {len(todo)} of {len(lengths)} sources{share}, {hours:.2f} h of audio, '
              f'in chunks of {chunk} frames with {ctx} frames of left context -> {npy}', flush=True)

    def latents(k):   # -> [(source, [latent chunks])] for the run of sources from todo[k] on
        n = int(lengths[todo[k]])
        run = todo[k:k + batch] if vae.n_frames(n) <= chunk else todo[k:k + 1]
        run = run[:next((j for j, i in enumerate(run) if lengths[i] != n), len(run))]
        if len(run) == 1:
            read_one = lambda a, c: read(run[0], a, c)
            return [(run[0], encode_chunks(vae, read_one, n, device, chunk, ctx, bucket))]
        x = np.stack([read(i, 0, n) for i in run])
        if bucket > 1:   # padded as encode_chunks pads: the same input shapes, the same values
            x = np.pad(x, ((0, 0), (0, -(-vae.n_frames(n) // bucket) * bucket * vae.hop - n)))
        z = vae.encode(torch.from_numpy(x).to(device))[:, :vae.n_frames(n)]
        return [(i, [zi]) for i, zi in zip(run, z)]
    # Plain writes at an offset, no writable memmap: written pages never count in this process's
    # memory.
    with open(npy, 'r+b', buffering=0) as f, open(done_path, 'r+b', buffering=0) as fd:
        encoded = []
        for k, i in enumerate(todo):
            encoded = encoded or latents(k)
            i, zs = encoded.pop(0)
            pos = starts[i]
            for z in zs:
                f.seek(offset + int(pos) * dim * dtype.itemsize)
                f.write(z.float().cpu().numpy().astype(dtype).tobytes())
                pos += len(z)
            fd.seek(i)
            fd.write(b'\x01')  # after its latents: a source is done only once they are on disk
            secs += lengths[i] / vae.cfg.sample_rate
            if time.time() - t_trim > 10 or k + 1 == len(todo):
                # Hand the freed heap back to the OS now and then (glibc keeps it), so that the LM
                # stage starts from the memory of one chunk. Not after every source: that cost ~30
                # ms per toy clip.
                malloc_trim(0)
                t_trim = time.time()
            if verbose and (time.time() - t_print > 10 or k + 1 == len(todo)):
                t_print, el = time.time(), time.time() - t0
                eta = (hours * 3600 - secs) * el / max(secs, 1e-9)
                print(f'encode {k + 1}/{len(todo)} sources{share} | '
                      f'{secs / 3600:.2f}/{hours:.2f} h | {secs / el:.0f}x real time | '
                      f'ETA {fmt_time(eta)}', flush=True)


# --------------------------------------------------------------------------------------------------
# 4. The LM's batches: windows of the latent cache

def window_batch(latents, step, seed, batch, length, rank=0, texts=None):
    """Random windows of `length` frames from the cached latent sequences; pure function of (seed,
    step). latents: a list of [frames, D] tensors or a corpus.LatentCache (memmap; only the windows
    are read). Sequences are drawn uniformly, or in proportion to their length when the cache says
    so (--data: files of any length). texts (one list of word ids per cached clip): also return each
    window's clip description as ids [batch, L] (calm.pad_text); the windows drawn are the same
    with or without texts."""
    g = np.random.default_rng([seed, step, rank, 1])
    cum = getattr(latents, 'cum', None)
    windows, ids = [], []
    for b in range(batch):
        if cum is None:
            i = g.integers(len(latents))
        else:
            i = int(np.searchsorted(cum, g.integers(cum[-1]), side='right'))
        z = latents[i]
        ids.append(texts[i] if texts is not None else [])
        start = g.integers(max(1, z.shape[0] - length + 1))
        w = z[start:start + length]
        if isinstance(w, np.ndarray):  # a memory-mapped cache: read this window only, as float32
            w = torch.from_numpy(w.astype(np.float32))
        if w.shape[0] < length:  # short clips: repeat the last frame rather than invent silence
            w = torch.cat([w, w[-1:].expand(length - w.shape[0], -1)])
        windows.append(w)
    if texts is not None:
        return torch.stack(windows), calm.pad_text(ids, len(data.VOCAB))
    return torch.stack(windows)
