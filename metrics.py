"""
The measures, all numpy, taken on audio (a reader can skip this file until evaluate.py): f0 and
note-pitch accuracy (does the audio still play the annotated melody?), log-mel distance (spectral
envelope), SI-SDR (waveform fidelity); note transcription, the timbre, mode and tempo detectors
and the Frechet distance that score a generated continuation; and the continuation protocol's
prompt length and scores (`score_continuation`).

Written once and used by evaluate.py (which reports them), tour.py and the tests, so every number
in README.md and docs/ comes from the same code.
"""
import math

import numpy as np

import data

# -----------------------------------------------------------------------------------------------
# Pitch: YIN (de Cheveigné & Kawahara 2002), the cumulative-mean-normalised difference function.
# Robust to the missing/weak fundamentals and odd-harmonic spectra of the toy instruments, and to
# the octave-up errors plain autocorrelation peak picking makes.

def estimate_f0(wav, sr, fmin=60.0, fmax=2000.0, threshold=0.15, voiced_max=0.35):
    """f0 in Hz of a (roughly stationary) segment of audio; 0.0 if silent or unvoiced."""
    x = np.asarray(wav, dtype=np.float64).ravel()
    x = x - x.mean() if x.size else x
    tau_min, tau_max = max(2, int(sr / fmax)), int(np.ceil(sr / fmin))
    tau_max = min(tau_max, x.size // 2 - 1)  # short segments: at least two periods must fit
    if tau_max <= tau_min + 1 or np.sqrt(np.mean(x ** 2)) < 1e-4:
        return 0.0
    w = x.size - tau_max  # integration window
    # d(tau) = sum_j (x_j - x_{j+tau})^2 for j < w, via an FFT cross-correlation and cumulative
    # energies.
    nfft = 1 << int(np.ceil(np.log2(x.size + w)))
    xc = np.fft.irfft(np.fft.rfft(x, nfft) * np.conj(np.fft.rfft(x[:w], nfft)), nfft)[:tau_max + 1]
    e = np.concatenate([[0.0], np.cumsum(x ** 2)])
    energy_shift = e[w + np.arange(tau_max + 1)] - e[np.arange(tau_max + 1)]
    d = e[w] + energy_shift - 2 * xc
    d[0] = 0.0
    cmnd = np.ones_like(d)
    cmnd[1:] = d[1:] * np.arange(1, tau_max + 1) / np.maximum(np.cumsum(d[1:]), 1e-12)
    # First dip under the threshold (then walk to its local minimum); else the global minimum.
    below = np.nonzero(cmnd[tau_min:] < threshold)[0]
    if below.size:
        tau = tau_min + below[0]
        while tau + 1 <= tau_max and cmnd[tau + 1] < cmnd[tau]:
            tau += 1
    else:
        tau = tau_min + int(np.argmin(cmnd[tau_min:]))
    if cmnd[tau] > voiced_max:
        return 0.0
    # Parabolic interpolation for sub-sample lag.
    if tau_min < tau < tau_max:
        a, b, c = cmnd[tau - 1], cmnd[tau], cmnd[tau + 1]
        den = a - 2 * b + c
        shift = 0.5 * (a - c) / den if den > 1e-12 else 0.0
        tau = tau + float(np.clip(shift, -1, 1))
    return float(sr / tau)


def note_pitch_accuracy(wav, notes, sr):
    """Fraction of annotated notes whose estimated pitch (rounded MIDI) equals the annotation.

    f0 is measured on the middle of each note (from 30% to 75% of its duration) so that the attack
    transient and the release do not count. Notes that do not fit in `wav` are skipped; returns nan
    when no note fits.
    """
    wav = np.asarray(wav, dtype=np.float64).ravel()
    hits, total = 0, 0
    for note in notes:
        a = int(round((note.onset + 0.30 * note.duration) * sr))
        b = int(round((note.onset + 0.75 * note.duration) * sr))
        if b > wav.size or b - a < int(0.02 * sr):
            continue
        f0 = estimate_f0(wav[a:b], sr)
        total += 1
        hits += int(f0 > 0 and int(np.round(data.hz_to_midi(f0))) == int(note.pitch))
    return hits / total if total else float('nan')


# -----------------------------------------------------------------------------------------------
# Log-mel spectrogram with a fixed HTK-style triangular filterbank.

_MEL_CACHE = {}


def mel_filterbank(sr, n_fft, n_mels, fmin=0.0, fmax=None):
    """[n_mels, n_fft // 2 + 1] triangular filters equally spaced on the HTK mel scale."""
    key = (sr, n_fft, n_mels, fmin, fmax)
    if key not in _MEL_CACHE:
        fmax = fmax or sr / 2
        mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)
        imel = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)
        edges = imel(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
        freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
        lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
        fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
        _MEL_CACHE[key] = fb
    return _MEL_CACHE[key]


def log_mel(wav, sr, n_fft=1024, hop=256, n_mels=80, eps=1e-5):
    """log(mel power + eps), [frames, n_mels]; Hann window, frames centred with zero padding."""
    x = np.asarray(wav, dtype=np.float64).ravel()
    x = np.pad(x, (n_fft // 2, n_fft // 2))
    n_frames = 1 + max(0, (x.size - n_fft) // hop)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    spec = np.abs(np.fft.rfft(x[idx] * np.hanning(n_fft + 1)[:-1], axis=1)) ** 2
    return np.log(spec @ mel_filterbank(sr, n_fft, n_mels).T + eps)


def log_mel_l1(a, b, sr):
    """Mean absolute difference of log-mel spectrograms (natural log) over the common length."""
    n = min(len(a), len(b))
    return float(np.mean(np.abs(log_mel(np.asarray(a)[:n], sr) - log_mel(np.asarray(b)[:n], sr))))


def si_sdr(ref, est, eps=1e-8):
    """Scale-invariant signal-to-distortion ratio (dB; Le Roux et al. 2019) over the common length.
    """
    n = min(len(ref), len(est))
    r = np.asarray(ref, dtype=np.float64)[:n]
    e = np.asarray(est, dtype=np.float64)[:n]
    r, e = r - r.mean(), e - e.mean()
    target = (e @ r) / (r @ r + eps) * r
    return float(10 * np.log10((target @ target + eps) / ((e - target) @ (e - target) + eps)))


# --------------------------------------------------------------------------------------------------
# Transcription of a monophonic melody: spectral-flux onsets, then f0 per segment

def stft_mag(wav, n_fft=1024, hop=240):
    """|STFT| [frames, n_fft//2+1] with a Hann window; frame i is centred at i*hop."""
    wav = np.pad(np.asarray(wav, np.float32), (n_fft // 2, n_fft // 2))
    n = 1 + max(0, (len(wav) - n_fft) // hop)
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n)[:, None]
    return np.abs(np.fft.rfft(wav[idx] * np.hanning(n_fft), axis=1))


def detect_onsets(wav, sr, hop_s=0.01, min_gap=0.06, delta=0.08, min_rms=1e-3, rel_rms=0.1):
    """Onset times (s): peaks of the half-wave rectified spectral flux of log magnitudes (new energy
    appearing in any band catches both pitch changes and re-attacks of the same pitch), above a
    local mean + delta, at least min_gap apart, where the signal is not silent."""
    hop = int(round(hop_s * sr))
    mag = stft_mag(wav, hop=hop)
    if len(mag) < 3:
        return []
    logmag = np.log(np.maximum(mag, 1e-2 * mag.max() + 1e-9))  # 40 dB under the loudest bin: noise
                                                               # floors stay flat
    # SuperFlux-style (Boeck & Widmer 2013): compare with a max filter (+-3 bins) of the frame two
    # hops back, so vibrato moving a partial across neighbouring bins is not taken for a new note.
    prev = np.stack([np.roll(logmag, s, axis=1) for s in range(-3, 4)]).max(0)
    flux = np.maximum(logmag[2:] - prev[:-2], 0).sum(1)
    flux = np.concatenate([[0.0, 0.0], flux])
    flux[-3:] = 0  # the last frames see the zero padding: an abrupt end is not a note
    flux /= flux.max() + 1e-9
    rms = np.sqrt((mag ** 2).sum(1) * 2) / mag.shape[1]  # a loudness proxy per frame
    rms_gate = rms > max(min_rms, rel_rms * rms.max())  # not silent: within 20 dB of the loudest
    w, gap = 10, max(1, int(round(min_gap / hop_s)))
    onsets = []
    for i in range(1, len(flux) - 1):
        lo, hi = max(0, i - w), min(len(flux), i + w + 1)
        if (flux[i] == flux[max(0, i - 3):i + 4].max() and flux[i] > flux[lo:hi].mean() + delta
                and (rms_gate[i] or rms_gate[min(i + 2, len(flux) - 1)])):
            if not onsets or i - onsets[-1] >= gap:
                onsets.append(i)
    return [i * hop_s for i in onsets]


def transcribe(wav, sr, min_dur=0.04):
    """Notes (data.Note) of a monophonic melody: one note per onset, lasting to the next onset (or
    the end of the audio); pitch = rounded MIDI of estimate_f0 over the middle half of the segment;
    unvoiced segments are dropped."""
    onsets = detect_onsets(wav, sr)
    end_t = len(wav) / sr
    notes = []
    for k, t in enumerate(onsets):
        t_end = onsets[k + 1] if k + 1 < len(onsets) else end_t
        if t_end - t < min_dur:
            continue
        f0 = segment_f0(wav, sr, t, t_end)
        if f0 > 0:
            pitch = int(round(data.hz_to_midi(f0)))
            notes.append(data.Note(onset=t, duration=t_end - t, pitch=pitch))
    return notes


def segment_f0(wav, sr, t0, t1):
    """estimate_f0 over the middle half of [t0, t1] (at least 40 ms when the span allows)."""
    mid, half = (t0 + t1) / 2, max((t1 - t0) / 4, 0.02)
    a, b = int(max(0, mid - half) * sr), int(min(len(wav) / sr, mid + half) * sr)
    return estimate_f0(wav[a:b], sr) if b - a > 16 else 0.0


# --------------------------------------------------------------------------------------------------
# Timbre: nearest-centroid instrument family from harmonic partial ratios

def harmonic_profile(wav, sr, n_harm=8, win=0.085, hop=0.1):
    """Mean over voiced windows of the levels (dB, relative to the strongest partial, floored at
    -60) of partials 1..n_harm at k*f0; None if nothing is voiced. Level ratios of partials are what
    tells a clarinet-like (odd partials) from a saw-like or a sine-like tone, independent of pitch.
    """
    n = int(win * sr)
    feats = []
    for a in range(0, len(wav) - n + 1, int(hop * sr)):
        seg = wav[a:a + n]
        if np.sqrt(np.mean(seg ** 2)) < 1e-3:
            continue
        f0 = estimate_f0(seg, sr)
        if f0 <= 0:
            continue
        spec = np.abs(np.fft.rfft(seg * np.hanning(n), 8 * n))
        df = sr / (8 * n)
        levels = np.full(n_harm, 1e-9)
        for k in range(1, n_harm + 1):
            f = k * f0
            if f < sr / 2 - 100:
                w = max(0.03 * f, 2 * sr / n)  # +-3 % or +-2 bins of the unpadded window
                levels[k - 1] = spec[int((f - w) / df):int((f + w) / df) + 1].max()
        feats.append(np.maximum(20 * np.log10(levels / levels.max()), -60.0))
    return np.mean(feats, 0) if feats else None


class TimbreDetector:
    """Fit on labelled clips (family centroids of harmonic_profile); predict the nearest family."""

    def __init__(self, clips, sr=data.SR):
        by_family = {}
        for c in clips:
            p = harmonic_profile(c.wav, sr)
            if p is not None:
                by_family.setdefault(c.meta['family'], []).append(p)
        self.families = sorted(by_family)
        self.centroids = np.stack([np.mean(by_family[f], 0) for f in self.families])
        self.sr = sr

    def predict(self, wav):
        p = harmonic_profile(wav, self.sr)
        if p is None:
            return None
        return self.families[int(np.argmin(((self.centroids - p) ** 2).sum(1)))]


# --------------------------------------------------------------------------------------------------
# Key (mode) and tempo: the detectors that check a generation against the words of its description.
# Scale fit alone cannot tell a major key from its relative minor (same pitch set), so the tonic is
# taken from the first transcribed note (every toy motif starts on its tonic, data.make_clip) and
# the two scales are fitted on that tonic; a tie (the motif avoids the 3rd, 6th and 7th) falls back
# to the best of the 24 rotated Krumhansl-Kessler key profiles. Measured on 48 real held-out clips:
# 0.94 (first note alone 0.88, profiles alone 0.63).
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def detect_mode(wav, sr):
    """'major' / 'minor' from the duration-weighted pitch classes of `transcribe`'s notes; None
    without notes."""
    notes = transcribe(wav, sr)
    hist = np.zeros(12)
    for n in notes:
        hist[n.pitch % 12] += n.duration
    if hist.sum() == 0:
        return None
    tonic = notes[0].pitch % 12
    fit = {m: sum(hist[(tonic + d) % 12] for d in data.SCALES[m]) for m in ('major', 'minor')}
    if fit['major'] != fit['minor']:
        return max(fit, key=fit.get)
    if hist.std() == 0:
        return None
    return max((np.corrcoef(hist, np.roll(prof, k))[0, 1], mode)
               for mode, prof in (('major', KK_MAJOR), ('minor', KK_MINOR)) for k in range(12))[1]


def detect_tempo_class(wav, sr):
    """'slow' / 'medium' / 'fast' from onsets: median inter-onset interval, folded by octaves into
    the toy's beat range (a median on half-beat or two-beat notes is off by a factor 2), -> BPM ->
    the classes of data.make_clip (< 114, < 142, else fast); None with fewer than 3 onsets."""
    ioi = np.diff(detect_onsets(wav, sr))
    ioi = ioi[(ioi > 0.12) & (ioi < 2.0)]
    if len(ioi) < 2:
        return None
    beat = float(np.median(ioi))
    lo, hi = 60 / data.TEMPO_RANGE[1], 60 / data.TEMPO_RANGE[0]
    while beat < lo * 0.97:
        beat *= 2
    while beat > hi * 1.03:
        beat /= 2
    bpm = 60 / beat
    return 'slow' if bpm < 114 else ('medium' if bpm < 142 else 'fast')


# --------------------------------------------------------------------------------------------------
# A paired distance: a continuation against the clip's own true continuation

def mel_distance(wav, ref, sr, floor_db=60.0):
    """Mean absolute difference (dB) of the mel spectrograms of wav and ref over their common
    length, each floored at floor_db under ref's loudest mel bin: what is inaudible next to the
    reference (the empty bands between the toy's partials, 80-100 dB down) does not count, the
    notes, their timing, timbre and loudness do. 0 for ref itself; paired, so it asks whether
    this clip went on as it truly did (a set-level distance against other clips cannot)."""
    n = min(len(wav), len(ref))
    to_db = lambda w: 10 / math.log(10) * log_mel(np.asarray(w)[:n], sr, eps=1e-10)
    a, b = to_db(wav), to_db(ref)
    floor = b.max() - floor_db
    return float(np.mean(np.abs(np.maximum(a, floor) - np.maximum(b, floor))))


# --------------------------------------------------------------------------------------------------
# Frechet distance on a fixed embedding (FAD-like, nothing from the model under test)

def embed(wavs, sr, dim=32, context=4, seed=0):
    """Per-frame embeddings of a set of waveforms: `context` consecutive log_mel frames (stacked, so
    short-time dynamics count) mapped by a fixed seeded Gaussian random projection to `dim` dims.
    Returns [total frames, dim]. Same seed -> same projection for every set, so distances compare.
    """
    mels = [log_mel(w, sr) for w in wavs]
    n_mels = mels[0].shape[1]
    n_in = context * n_mels
    proj = np.random.default_rng(seed).standard_normal((n_in, dim)) / math.sqrt(n_in)
    rows = []
    for m in mels:
        if len(m) >= context:
            stacked = np.concatenate([m[i:len(m) - context + 1 + i] for i in range(context)], 1)
            rows.append(stacked @ proj)
    return np.concatenate(rows, 0)


def frechet(a, b):
    """Frechet distance between Gaussians fitted to the rows of a and b:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), matrix square roots by eigh of
    symmetric matrices (numpy only)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev, vec = np.linalg.eigh(s_a)
    sqrt_a = (vec * np.sqrt(np.maximum(ev, 0))) @ vec.T
    cross = np.linalg.eigvalsh(sqrt_a @ s_b @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                 - 2 * np.sqrt(np.maximum(cross, 0)).sum())


# --------------------------------------------------------------------------------------------------
# A continuation scored against the true one

BOUNDARY_SKIP = 0.1  # s: true notes starting this close to the prompt boundary are not scored


def prompt_frames(clip, frame_rate, prompt_seconds=None):
    """Prompt length in latent frames: `prompt_seconds` when given, else (auto) the whole frames
    before the third repetition of the motif starts, so the prompt holds two full repetitions and
    the continuation is predictable (its last ~0.1 s may be cut). A fixed 4 s prompt holds two
    repetitions in only ~17 % of toy clips (motifs of 4-6 notes at 86-170 BPM last 1.5-5 s)."""
    if prompt_seconds:
        return int(round(prompt_seconds * frame_rate))
    # end BOUNDARY_SKIP before the third repetition's first note, so that note is scored too
    return int((clip.notes[2 * len(clip.meta['motif'])].onset - BOUNDARY_SKIP) * frame_rate)


def true_notes(clip, t0, t1):
    """Annotated notes with onset >= t0 + BOUNDARY_SKIP whose measured part (note_pitch_accuracy
    reads 30-75 % of the note) ends before t1."""
    return [n for n in clip.notes
            if t0 + BOUNDARY_SKIP <= n.onset and n.onset + 0.75 * n.duration <= t1]


def score_continuation(wav, clip, t0, t1, sr=data.SR, tol=0.1, detector=None):
    """Counts for one clip; `wav` covers the clip's time axis (prompt + continuation, or the real
    clip) and only [t0, t1) is scored. Aggregate with `summarise` (pooled over clips)."""
    wav = np.asarray(wav, np.float32)[:int(t1 * sr)]
    ref = true_notes(clip, t0, t1)
    cont = wav[int(t0 * sr):]
    gen = [n for n in transcribe(cont, sr)]
    for n in gen:
        n.onset += t0
    gen = [n for n in gen if n.onset >= t0 + BOUNDARY_SKIP]
    # transcribed notes at annotated notes that are not scored (cut by the span's ends) are not
    # counted either
    unscored = [n.onset for n in clip.notes if n not in ref]
    gen = [g for g in gen if not any(abs(g.onset - t) <= tol for t in unscored)]
    used, hits = set(), 0
    for r in ref:  # greedy one-to-one matching: same pitch, closest onset within tol
        cands = [(abs(g.onset - r.onset), j) for j, g in enumerate(gen)
                 if j not in used and g.pitch == r.pitch and abs(g.onset - r.onset) <= tol]
        if cands:
            used.add(min(cands)[1])
            hits += 1
    scale = data.SCALES[clip.meta['mode']]
    in_key = sum((g.pitch - clip.meta['tonic']) % 12 in scale for g in gen)
    family = detector.predict(cont) if detector is not None else None
    # note_pitch_accuracy per note (f0 over 30-75 % of the note's span); nan (note does not fit) =
    # wrong
    n_pitch = sum(note_pitch_accuracy(wav, [r], sr) == 1.0 for r in ref)
    a = int(t0 * sr)
    return dict(n_ref=len(ref), n_pitch=int(n_pitch),
                n_hit=hits, n_gen=len(gen), n_in_key=in_key,
                timbre=None if detector is None else float(family == clip.meta['family']),
                mel_db=mel_distance(cont, clip.wav[a:int(t1 * sr)], sr))


def summarise(counts, fd=None):
    """Pool per-clip counts into the reported fractions (see the module docstring)."""
    s = {k: sum(c[k] for c in counts) for k in ('n_ref', 'n_pitch', 'n_hit', 'n_gen', 'n_in_key')}
    r = s['n_hit'] / max(s['n_ref'], 1)
    p = s['n_hit'] / max(s['n_gen'], 1)
    out = dict(note_acc=s['n_pitch'] / max(s['n_ref'], 1), onset_r=r, onset_p=p,
               onset_f1=2 * r * p / (r + p) if r + p > 0 else 0.0,
               key=s['n_in_key'] / max(s['n_gen'], 1),
               n_notes=s['n_ref'], n_gen=s['n_gen'])
    timbres = [c['timbre'] for c in counts if c['timbre'] is not None]
    out['timbre'] = float(np.mean(timbres)) if timbres else None
    out['mel_db'] = float(np.mean([c['mel_db'] for c in counts]))
    out['fd'] = fd
    return out


def bootstrap_ci(counts, n_boot=2000, seed=0, level=0.95):
    """95% intervals of note_acc, key and timbre from resampling the clips with replacement, each
    resample pooled as `summarise` pools (Efron's percentile interval). The resamples depend only
    on (seed, number of clips), so rows scored on the same clips share them (paired)."""
    idx = np.random.default_rng(seed).integers(len(counts), size=(n_boot, len(counts)))
    col = lambda k: np.array([c[k] for c in counts], np.float64)[idx].sum(1)
    ratios = {'note_acc': col('n_pitch') / np.maximum(col('n_ref'), 1),
              'key': col('n_in_key') / np.maximum(col('n_gen'), 1)}
    if all(c['timbre'] is not None for c in counts):
        ratios['timbre'] = col('timbre') / len(counts)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {f'{k}_ci': [float(v) for v in np.percentile(r, q)] for k, r in ratios.items()}
