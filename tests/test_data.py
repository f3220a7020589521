"""Toy data, audio loading and metrics (data.py, metrics.py)."""
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import metrics

SR = data.SR


def test_clip_is_deterministic_per_seed():
    a, b = data.make_clip(123, seconds=3.0), data.make_clip(123, seconds=3.0)
    assert np.array_equal(a.wav, b.wav)
    assert a.notes == b.notes and a.meta == b.meta


def test_different_seeds_differ():
    a, b = data.make_clip(1, seconds=3.0), data.make_clip(2, seconds=3.0)
    assert not np.array_equal(a.wav, b.wav)


def test_clip_format_and_meta():
    c = data.make_clip(7, seconds=4.0)
    assert c.wav.dtype == np.float32 and c.wav.shape == (4 * SR,)
    assert np.all(np.isfinite(c.wav)) and 0.3 < np.abs(c.wav).max() <= 1.0
    for k in ('family', 'mode', 'tonic', 'tempo', 'tempo_class', 'motif', 'seed'):
        assert k in c.meta
    assert c.meta['family'] in data.FAMILIES and c.meta['mode'] in ('major', 'minor')
    assert c.meta['tempo_class'] in ('slow', 'medium', 'fast') and 0 <= c.meta['tonic'] < 12
    assert 4 <= len(c.meta['motif']) <= 6


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_notes_follow_the_repeating_motif(seed):
    c = data.make_clip(seed, seconds=6.0)
    motif = c.meta['motif']
    pitches = [n.pitch for n in c.notes]
    assert len(pitches) >= len(motif)  # the motif is heard at least once
    assert pitches[:len(motif)] == motif
    for n in c.notes:
        assert data.PITCH_RANGE[0] <= n.pitch <= data.PITCH_RANGE[1]
        assert 0.2 <= n.duration <= 0.75  # several 80 ms latent frames per note
        scale = data.MAJOR if c.meta['mode'] == 'major' else data.MINOR
        assert (n.pitch - c.meta['tonic']) % 12 in scale
    onsets = [n.onset for n in c.notes]
    assert onsets == sorted(onsets)


def test_annotations_match_the_audio():
    # The pitch tracker hears the annotated melody, for every instrument family.
    clips = data.toy_clips('heldout', 12, seconds=4.0)
    assert {c.meta['family'] for c in clips} == set(data.FAMILIES)
    for c in clips:
        assert metrics.note_pitch_accuracy(c.wav, c.notes, SR) == 1.0
    # and a wrong annotation is caught
    c = clips[0]
    shifted = [data.Note(n.onset, n.duration, n.pitch + 1) for n in c.notes]
    assert metrics.note_pitch_accuracy(c.wav, shifted, SR) == 0.0


def test_splits_are_disjoint():
    train = {data.clip_seed('train', i) for i in range(1000)}
    held = {data.clip_seed('heldout', i) for i in range(1000)}
    assert not train & held
    with pytest.raises(ValueError):
        data.clip_seed('test', 0)


# -----------------------------------------------------------------------------------------------
# load_audio

def one_line_value_error(path):
    with pytest.raises(ValueError) as e:
        data.load_audio(path)
    assert '\n' not in str(e.value) and str(e.value)


def test_load_audio_bad_inputs(tmp_path):
    one_line_value_error(tmp_path / 'missing.wav')
    one_line_value_error(tmp_path)  # a directory
    (tmp_path / 'empty.wav').write_bytes(b'')
    one_line_value_error(tmp_path / 'empty.wav')
    (tmp_path / 'junk.wav').write_bytes(b'this is not audio at all' * 10)
    one_line_value_error(tmp_path / 'junk.wav')
    x = np.zeros(1000, np.float32)
    x[10] = np.nan
    sf.write(tmp_path / 'nan.wav', x, SR, subtype='FLOAT')
    one_line_value_error(tmp_path / 'nan.wav')
    x[10] = np.inf
    sf.write(tmp_path / 'inf.wav', x, SR, subtype='FLOAT')
    one_line_value_error(tmp_path / 'inf.wav')
    sf.write(tmp_path / 'zero.wav', np.zeros((0, 1), np.float32), SR)
    one_line_value_error(tmp_path / 'zero.wav')


@pytest.mark.parametrize('file_sr', [16000, 44100, 48000])
def test_load_audio_resamples_and_mixes(tmp_path, file_sr):
    t = np.arange(file_sr) / file_sr  # 1 s
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 440 * t)], 1)
    sf.write(tmp_path / 'a.flac', stereo, file_sr)
    y = data.load_audio(tmp_path / 'a.flac')
    assert y.dtype == np.float32 and y.ndim == 1 and abs(len(y) - SR) <= 1
    assert abs(metrics.estimate_f0(y[2000:8000], SR) - 440.0) < 2.0
    assert abs(np.abs(y[2000:-2000]).max() - 0.4) < 0.02  # the channel mean


# -----------------------------------------------------------------------------------------------
# metrics

@settings(max_examples=25, deadline=None)
@given(st.integers(40, 88), st.sampled_from(data.FAMILIES))
def test_estimate_f0_on_notes(midi, family):
    rng = np.random.default_rng(midi)
    wav = data.render_note(float(data.midi_to_hz(midi)), SR // 4, family, rng)
    f0 = metrics.estimate_f0(wav[SR // 20:], SR)
    assert round(float(data.hz_to_midi(f0))) == midi


def test_estimate_f0_unvoiced():
    assert metrics.estimate_f0(np.zeros(4000), SR) == 0.0
    assert metrics.estimate_f0(np.random.default_rng(0).standard_normal(4000), SR) == 0.0
    assert metrics.estimate_f0(np.zeros(10), SR) == 0.0


def test_si_sdr_and_log_mel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SR)
    assert metrics.si_sdr(x, 3.0 * x) > 60  # scale-invariant
    noisy = x + 0.1 * rng.standard_normal(SR)
    assert abs(metrics.si_sdr(x, noisy) - 20.0) < 0.5
    m = metrics.log_mel(x, SR)
    assert m.shape == (SR // 256 + 1, 80) and np.all(np.isfinite(m))
    assert metrics.log_mel_l1(x, x, SR) == 0.0
    assert metrics.log_mel_l1(x, 0.5 * x, SR) > 0.5
