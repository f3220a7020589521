"""
Toy music for calm, and loading your own audio. The first file to read: what the data is.

The toy task stands in for the paper's music data: every clip is a monophonic melody at
24 kHz built from a short motif that repeats, so that a language model on VAE latents can learn
something checkable (key, tempo, timbre, the motif itself) and evaluation can measure it with a
pitch tracker (metrics.py). Everything is a pure function of an integer seed.

    clip = make_clip(seed)            # Clip(wav float32 [n], notes [Note], meta dict)
    clips = toy_clips('train', 512)   # train / heldout use disjoint seed ranges
    wav = load_audio('song.flac')     # float32 mono at 24 kHz (a folder of audio: corpus.py)

    python data.py prompt out/prompt.wav   # a held-out clip as a wav: a prompt for sample.py
"""
import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import soundfile as sf
import soxr

SR = 24000  # the sample rate of the paper's speech VAE; the toy uses it too

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)  # natural minor
SCALES = {'major': MAJOR, 'minor': MINOR}
PITCH_RANGE = (55, 81)          # MIDI G3..A5: comfortable for a pitch tracker, well below Nyquist
TEMPO_RANGE = (86.0, 170.0)     # BPM; one beat = 0.35..0.70 s, i.e. 4-9 latent frames of 80 ms
FAMILIES = ('flute', 'clarinet', 'string', 'organ', 'bell')
TRAIN_SEEDS, HELDOUT_SEEDS = 0, 1_000_000_000  # split offsets: 'train' seeds never reach 1e9


@dataclass
class Note:
    onset: float     # seconds
    duration: float  # seconds (the sounding part, release included)
    pitch: int       # MIDI


@dataclass
class Clip:
    wav: np.ndarray                    # float32 [n] in [-1, 1]
    notes: list = field(default_factory=list)  # list[Note], the melody
    meta: dict = field(default_factory=dict)


def midi_to_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69.0) / 12.0)


def hz_to_midi(f):
    return 69.0 + 12.0 * np.log2(np.asarray(f, dtype=np.float64) / 440.0)


# -----------------------------------------------------------------------------------------------
# Timbre: relative amplitude of harmonic k (k = 1, 2, ...) and the envelope of one note.
# All partials are harmonic so the melody's pitch is well defined (a bell with inharmonic partials
# would make the pitch-accuracy metric ambiguous).

def partial_weights(family, n):
    k = np.arange(1, n + 1, dtype=np.float64)
    if family == 'flute':      # almost a sine: strong fundamental, weak 2nd/3rd
        w = np.where(k == 1, 1.0, 0.0) + np.where(k == 2, 0.2, 0.0) + np.where(k == 3, 0.06, 0.0)
    elif family == 'clarinet':  # odd harmonics, ~1/k
        w = np.where(k % 2 == 1, 1.0 / k, 0.03 / k)
    elif family == 'string':   # sawtooth-like 1/k
        w = 1.0 / k
    elif family == 'organ':    # octave-ish drawbars (1, 2, 3, 4, 6, 8)
        w = np.zeros(n)
        for h, a in ((1, 1.0), (2, 0.6), (3, 0.35), (4, 0.3), (6, 0.15), (8, 0.12)):
            if h <= n:
                w[h - 1] = a
    elif family == 'bell':     # mallet: fundamental plus a bright 4th and 10th harmonic
        w = np.where(k == 1, 1.0, 0.0) + np.where(k == 4, 0.35, 0.0) \
            + np.where(k == 10, 0.12, 0.0) + np.where(k == 2, 0.15, 0.0)
    else:
        raise ValueError(f'unknown instrument family {family!r}')
    return w


ENVELOPES = {  # attack (s), exponential decay rate (1/s) of the sustain, how much partials >1 decay
               # faster
    'flute': (0.04, 0.8, 1.0), 'clarinet': (0.03, 0.6, 1.0), 'string': (0.06, 0.5, 1.0),
    'organ': (0.01, 0.0, 1.0), 'bell': (0.003, 4.0, 2.5),
}


def render_note(f0, n, family, rng):
    """One note of n samples at f0 Hz: harmonic partials with an attack / decay / release envelope.
    """
    t = np.arange(n) / SR
    attack, decay, bright_decay = ENVELOPES[family]
    n_partials = max(1, min(16, int(0.45 * SR / f0)))  # stay well under Nyquist
    w = partial_weights(family, n_partials)
    vib = np.zeros(n)
    if family in ('string', 'flute'):  # gentle vibrato (+-12 cents): realistic, harmless to the
                                       # pitch metric
        vib = 0.007 * np.sin(2 * np.pi * rng.uniform(4.5, 6.0) * t) * np.minimum(1.0, t / 0.2)
    phase = 2 * np.pi * f0 * np.cumsum(1.0 + vib) / SR
    env = np.minimum(1.0, t / attack) * np.exp(-decay * t)
    release = min(n, int(0.03 * SR))  # 30 ms fade-out: no clicks between notes
    env[n - release:] *= np.linspace(1.0, 0.0, release)
    out = np.zeros(n)
    for k in range(n_partials):
        if w[k] == 0.0:
            continue
        pk = env * np.exp(-decay * (bright_decay - 1.0) * k * t) if bright_decay != 1.0 else env
        out += w[k] * pk * np.sin((k + 1) * phase + rng.uniform(0, 2 * np.pi))
    return out


# -----------------------------------------------------------------------------------------------
# Clips

def draw_attributes(rng):
    """The first draws of make_clip: (tonic, mode, tempo, tempo_class, family). Shared with
    clip_description so a clip's description costs no audio rendering."""
    tonic = int(rng.integers(12))
    mode = 'major' if rng.random() < 0.5 else 'minor'
    tempo = float(rng.uniform(*TEMPO_RANGE))
    tempo_class = 'slow' if tempo < 114 else ('medium' if tempo < 142 else 'fast')
    family = FAMILIES[rng.integers(len(FAMILIES))]
    return tonic, mode, tempo, tempo_class, family


def make_clip(seed: int, seconds: float = 8.0, accompaniment: bool = False) -> Clip:
    """A deterministic toy clip: a motif of 4-6 scale notes repeated at a fixed tempo by one
    instrument.

    accompaniment=True adds a quiet sustained bass (tonic, two octaves under the melody's register);
    it is off by default so the melody's pitch stays trivially measurable.
    """
    rng = np.random.default_rng(seed)
    tonic, mode, tempo, tempo_class, family = draw_attributes(rng)
    beat = 60.0 / tempo

    # Motif: scale degrees around a home tonic in the middle of the range, kept inside PITCH_RANGE.
    scale = SCALES[mode]
    home = 60 + tonic if 60 + tonic <= 68 else 48 + tonic  # tonic between MIDI 57 and 68
    ladder = [home + 12 * o + s for o in (-1, 0, 1) for s in scale]
    ladder = [p for p in ladder if PITCH_RANGE[0] <= p <= PITCH_RANGE[1]]
    i0 = ladder.index(home)
    n_motif = int(rng.integers(4, 7))
    motif, idx = [home], i0
    for _ in range(n_motif - 1):  # small steps and leaps, like a tune
        idx = int(np.clip(idx + rng.choice([-3, -2, -1, 1, 2, 3, 4]), 0, len(ladder) - 1))
        motif.append(ladder[idx])
    # Durations in beats: mostly one beat, some two-beat notes when that stays <= 0.75 s, half beats
    # when >= 0.25 s.
    choices = [1.0] + ([2.0] if 2 * beat <= 0.75 else []) + ([0.5] if 0.5 * beat >= 0.25 else [])
    p = None if len(choices) == 1 else [0.6] + [0.4 / (len(choices) - 1)] * (len(choices) - 1)
    beats = [float(rng.choice(choices, p=p)) for _ in motif]
    rest = float(rng.choice([0.0, 1.0]))  # optional one-beat rest between repetitions

    n = int(round(seconds * SR))
    wav = np.zeros(n)
    notes, t = [], float(rng.uniform(0.0, 0.3))
    gap = 0.08  # articulation: a note sounds for its slot minus 80 ms of silence
    while round(t * SR) < n:  # in samples: a float t just under `seconds` would otherwise never
                              # advance
        for pitch, b in zip(motif, beats):
            slot = b * beat
            dur = slot - gap * beat
            start = int(round(t * SR))
            if start >= n:
                break
            m = int(round(dur * SR))
            note = render_note(float(midi_to_hz(pitch)), m, family, rng) * rng.uniform(0.8, 1.0)
            end = min(n, start + m)
            wav[start:end] += note[:end - start]
            if (end - start) / SR >= 0.2:  # annotate only notes that are (almost) fully inside the
                                           # clip
                notes.append(Note(onset=start / SR, duration=(end - start) / SR, pitch=int(pitch)))
            t += slot
        t += rest * beat
    if accompaniment:
        bass = float(midi_to_hz(home - 24))
        tt = np.arange(n) / SR
        harmonics = sum(np.sin(2 * np.pi * h * bass * tt) / h for h in (1, 2, 3))
        wav += 0.25 * np.max(np.abs(wav)) * harmonics
    peak = np.max(np.abs(wav))
    if peak > 0:
        wav *= rng.uniform(0.5, 0.9) / peak
    meta = dict(family=family, mode=mode, tonic=tonic, tempo=tempo, tempo_class=tempo_class,
                motif=motif, beats=beats, seed=int(seed), accompaniment=accompaniment)
    return Clip(wav=wav.astype(np.float32), notes=notes, meta=meta)


def clip_seed(split: str, i: int) -> int:
    """Seed of the i-th clip of a split; 'train' and 'heldout' seed ranges never overlap."""
    if split not in ('train', 'heldout'):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 <= i < HELDOUT_SEEDS:
        raise ValueError(f'clip index out of range: {i}')
    return (TRAIN_SEEDS if split == 'train' else HELDOUT_SEEDS) + int(i)


def toy_clips(split, n, seconds=8.0, accompaniment=False):
    return [make_clip(clip_seed(split, i), seconds, accompaniment) for i in range(n)]


# -----------------------------------------------------------------------------------------------
# Descriptions: the toy's "text". A clip is described by its generating attributes,
# "<family> <mode> <tempo_class>", over a fixed 10-word vocabulary; word id = index in VOCAB.

MODES, TEMPO_CLASSES = ('major', 'minor'), ('slow', 'medium', 'fast')
VOCAB = FAMILIES + MODES + TEMPO_CLASSES


def description(meta) -> str:
    return f"{meta['family']} {meta['mode']} {meta['tempo_class']}"


def clip_description(seed: int) -> str:
    """description(make_clip(seed).meta) without rendering the audio."""
    _, mode, _, tempo_class, family = draw_attributes(np.random.default_rng(seed))
    return f'{family} {mode} {tempo_class}'


def tokenize(text: str) -> list:
    """'flute minor fast' -> word ids; any word outside VOCAB raises ValueError (one line naming it
    and listing the vocabulary). Order and repetition are free; an empty text is the null condition.
    """
    words = text.lower().split()
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise ValueError(f"unknown word(s) {', '.join(map(repr, unknown))}; "
                         f"vocabulary: {' '.join(VOCAB)}")
    return [VOCAB.index(w) for w in words]


# -----------------------------------------------------------------------------------------------
# Your own audio

def load_audio(path, sr=SR) -> np.ndarray:
    """Read an audio file as float32 mono at `sr` (mix channels, soxr resampling).

    Raises ValueError with a one-line message on missing, empty, unreadable or non-finite input.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f'audio file not found: {path}')
    if os.path.isdir(path):
        raise ValueError(f'expected an audio file, got a directory: {path}')
    if os.path.getsize(path) == 0:
        raise ValueError(f'audio file is empty (0 bytes): {path}')
    try:
        x, file_sr = sf.read(path, dtype='float32', always_2d=True)
    except Exception as e:  # soundfile raises several types; one clear line for all of them
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'cannot read audio file {path}: {reason}') from None
    if x.size == 0:
        raise ValueError(f'audio file has no samples: {path}')
    if not np.all(np.isfinite(x)):
        raise ValueError(f'audio file contains NaN or infinite samples: {path}')
    x = x.mean(axis=1)
    if file_sr != sr:
        x = soxr.resample(x, file_sr, sr)
    return np.ascontiguousarray(x, dtype=np.float32)


def crop_batch(clips, step, seed, batch, length, rank=0) -> np.ndarray:
    """The VAE's training batch [batch, length]: random crops of `clips` (zero-padded when shorter),
    a pure function of (seed, step, rank) so that a resumed run sees the same data."""
    g = np.random.default_rng([seed, step, rank])
    out = np.zeros((batch, length), np.float32)
    for b in range(batch):
        wav = clips[g.integers(len(clips))]
        start = g.integers(max(1, len(wav) - length + 1))
        piece = wav[start:start + length]
        out[b, :len(piece)] = piece
    return out


# -----------------------------------------------------------------------------------------------
# Command line: a prompt to try sample.py on, right after training

def write_atomic(path, write, suffix='.tmp'):
    """Write a file as write(tmp_path), then rename it onto path: an interruption at any moment
    leaves the previous file (or none), never a half-written one. Every file calm writes goes
    through here: checkpoints, caches, json, wavs."""
    tmp = path + suffix
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj, indent=None):
    def dump(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=indent)
    write_atomic(path, dump)


def write_wav(path, wav, sr=SR):
    """16-bit wav, written then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clipped = np.clip(wav, -1, 1)
    write_atomic(path, lambda tmp: sf.write(tmp, clipped, sr, format='WAV', subtype='PCM_16'),
                 '.tmp.wav')


def main(argv=None):
    p = argparse.ArgumentParser(description='Toy data from the command line. `python data.py '
                                'prompt out/prompt.wav` writes a prompt for sample.py.')
    sub = p.add_subparsers(dest='command', required=True, metavar='prompt')
    q = sub.add_parser('prompt', help='write a toy clip as a wav (default: held-out clip 0, '
                       'never trained on)')
    q.add_argument('out', nargs='?', default='out/prompt.wav',
                   help='output wav (default out/prompt.wav)')
    q.add_argument('--clip', type=int, default=0, help='index of the clip in its split (default 0)')
    q.add_argument('--seconds', type=float, default=5.0,
                   help='length in seconds (default 5: the toy LM reads the last 5.1 s of '
                        'a prompt)')
    q.add_argument('--split', choices=['heldout', 'train'], default='heldout',
                   help='which split (default heldout)')
    args = p.parse_args(argv)
    if args.seconds <= 0:
        raise ValueError('--seconds must be > 0')
    clip = make_clip(clip_seed(args.split, args.clip), args.seconds)
    write_wav(args.out, clip.wav)
    m = clip.meta
    print(f'wrote {args.out}: {args.split} toy clip {args.clip}, {args.seconds:g} s at {SR} Hz, '
          f'"{description(m)}", motif (MIDI) {" ".join(map(str, m["motif"]))}')
    print(f'continue it with: python sample.py {args.out}')


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # bad input: one clear line, no traceback
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
