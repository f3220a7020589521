"""
Audio metrics for calm, all numpy: f0 and note-pitch accuracy (does the audio still play the
annotated melody?), log-mel distance (spectral envelope), SI-SDR (waveform fidelity).

Written once and reused by the VAE tuning and by evaluate.py, so every number in README.md and docs/
comes from the same code.
"""
import numpy as np


def midi_to_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69.0) / 12.0)


def hz_to_midi(f):
    return 69.0 + 12.0 * np.log2(np.asarray(f, dtype=np.float64) / 440.0)


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
        hits += int(f0 > 0 and int(np.round(hz_to_midi(f0))) == int(note.pitch))
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
