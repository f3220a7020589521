"""evaluate.py: the scores are right on inputs whose answer is known (no model needed, no timed
asserts)."""
import argparse
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import soxr
import torch

import calm
import data
import evaluate as ev
import metrics
import rq
from bench import copy_bound, figure

SR = data.SR
T0, T1 = 4.0, 8.0  # prompt boundary and clip end (s)


@pytest.fixture(scope='module')
def clips():
    return data.toy_clips('heldout', 24)


def transpose(clip, semitones):
    """The clip with every note pitch-shifted by resampling its own segment (onset to next onset),
    so the onsets stay exactly where they were; a shortened segment is padded with silence."""
    wav, out = clip.wav, np.zeros_like(clip.wav)
    starts = [int(n.onset * SR) for n in clip.notes] + [len(wav)]
    ratio = 2 ** (semitones / 12)
    for a, b in zip(starts[:-1], starts[1:]):
        seg = soxr.resample(wav[a:b], SR * ratio, SR)[:b - a]  # played back at SR: pitch * ratio
        out[a:a + len(seg)] = seg
    notes = [data.Note(n.onset, n.duration, n.pitch + semitones) for n in clip.notes]
    return data.Clip(wav=out, notes=notes, meta=dict(clip.meta))


def onset_recall(wav, notes, tol=0.1):
    """Fraction of annotated notes with a transcribed onset within tol, whatever its pitch."""
    got = [n.onset for n in metrics.transcribe(wav, SR)]
    return np.mean([any(abs(g - n.onset) <= tol for g in got) for n in notes])


def test_clip_against_itself(clips):
    s = metrics.summarise([metrics.score_continuation(c.wav, c, T0, T1) for c in clips[:6]])
    assert s['n_notes'] > 20
    assert s['note_acc'] >= 0.95
    assert s['onset_r'] >= 0.85 and s['onset_p'] >= 0.85
    assert s['key'] >= 0.95


def test_transposed_copy_wrong_pitch_right_timing(clips):
    for c in clips[:4]:
        t = transpose(c, 1)
        # the copy is clean
        assert metrics.summarise([metrics.score_continuation(t.wav, t, T0, T1)])['note_acc'] >= 0.8
        # scored against the original's notes
        s = metrics.summarise([metrics.score_continuation(t.wav, c, T0, T1)])
        assert s['note_acc'] <= 0.1 and s['onset_r'] <= 0.1
        # ... while the timing still matches
        assert onset_recall(t.wav, metrics.true_notes(c, T0, T1)) >= 0.85


def test_silence_scores_zero(clips):
    silence = [metrics.score_continuation(np.zeros_like(c.wav), c, T0, T1) for c in clips[:3]]
    s = metrics.summarise(silence)
    assert s['note_acc'] == 0 and s['onset_r'] == 0 and s['onset_f1'] == 0
    assert s['n_gen'] == 0 and s['key'] == 0


def test_transcriber_finds_annotated_notes(clips):
    for c in clips[:4]:
        ref = metrics.true_notes(c, 0.0, len(c.wav) / SR)
        got = metrics.transcribe(c.wav, SR)
        hit = [any(g.pitch == n.pitch and abs(g.onset - n.onset) <= 0.05 for g in got) for n in ref]
        assert np.mean(hit) >= 0.9, (c.meta, len(ref), len(got))
        assert len(got) <= 1.15 * len(ref) + 1  # few spurious notes


def test_frechet_math():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 4))
    b = rng.standard_normal((20000, 4)) * np.array([1, 2, 1, 1]) + np.array([3, 0, 0, 0])
    # closed form for diagonal covariances: |mu_a - mu_b|^2 + sum (s_a - s_b)^2 = 9 + 1
    assert metrics.frechet(a, b) == pytest.approx(10.0, rel=0.05)
    assert abs(metrics.frechet(a, a)) < 1e-6


def test_frechet_real_splits_vs_noise_and_transposed(clips):
    cut = lambda w: w[int(T0 * SR):int(T1 * SR)]
    a, b = clips[:12], clips[12:24]
    emb_a = metrics.embed([cut(c.wav) for c in a], SR)
    real = metrics.frechet(emb_a, metrics.embed([cut(c.wav) for c in b], SR))
    noises = [0.1 * np.random.default_rng(1).standard_normal(4 * SR) for _ in b]
    noise = metrics.frechet(emb_a, metrics.embed(noises, SR))
    octave = metrics.frechet(emb_a, metrics.embed([cut(transpose(c, 12).wav) for c in b], SR))
    assert abs(metrics.frechet(emb_a, emb_a)) < 1e-6
    assert real < 0.1 * noise and real < 0.5 * octave, (real, noise, octave)


def test_timbre_detector_on_clean_clips(clips):
    det = metrics.TimbreDetector(data.toy_clips('train', 24))
    assert len(det.families) >= 2
    acc = np.mean([det.predict(c.wav) == c.meta['family'] for c in clips])
    assert acc >= 0.8, (acc, det.families)
    assert det.predict(np.zeros(SR, np.float32)) is None


def test_auto_prompt_holds_two_motif_repetitions():
    for c in data.toy_clips('heldout', 20, seconds=16.0):
        m, t0 = len(c.meta['motif']), metrics.prompt_frames(c, 12.5) / 12.5
        assert c.notes[2 * m - 1].onset < t0  # the second repetition's last note starts inside the
                                              # prompt
        # 3rd is scored
        skip = metrics.BOUNDARY_SKIP
        assert t0 + skip <= c.notes[2 * m].onset < t0 + skip + 0.08
        assert [n.pitch for n in c.notes[:2 * m]] == c.meta['motif'] * 2


# --- the whole continuation pipeline on a fake VAE and an oracle / silent LM ----------------------

class ReshapeVAE(torch.nn.Module):
    """'Latents' are the raw samples of each frame: a perfect codec, 12.5 frames/s."""
    hop, frame_rate = 1920, 12.5

    def encode(self, wav):
        T = -(-wav.shape[1] // self.hop) * self.hop
        padded = torch.nn.functional.pad(wav, (0, T - wav.shape[1]))
        return padded.reshape(wav.shape[0], -1, self.hop)

    def decode(self, lat):
        return lat.reshape(lat.shape[0], -1)

    def quantise(self, lat):   # what the decoder reads of encoded latents (vae.VAE.quantise)
        return lat


class FakeLM(torch.nn.Module):
    """Returns the true continuation frames of the given clips (oracle) or zeros (silent)."""
    kind, multistep = 'calm', True   # the LM interface evaluate.py reads (pipeline.KINDS)

    def __init__(self, clips, oracle):
        super().__init__()
        self.lat = ReshapeVAE().encode(torch.tensor(np.stack([c.wav for c in clips])))
        self.oracle, self.i = oracle, 0

    def generate(self, prompt, n_frames, steps=1, temperature=0.7, generator=None):
        B, P, _ = prompt.shape
        out = self.lat[self.i:self.i + B, P:P + n_frames]
        self.i = (self.i + B) % len(self.lat)
        out = torch.cat([out, torch.zeros(B, n_frames - out.shape[1], out.shape[2])], 1)
        return out if self.oracle else torch.zeros_like(out)


@pytest.mark.parametrize('prompt_seconds', [T0, None])  # fixed 4 s, or auto (two motif repetitions)
def test_continuation_pipeline_oracle_and_silent(clips, prompt_seconds):
    args = argparse.Namespace(prompt_seconds=prompt_seconds, continue_seconds=T1 - T0, steps=[1],
                              temperature=[None], seed=0, tol=0.1)
    det = metrics.TimbreDetector(data.toy_clips('train', 12))
    if prompt_seconds is None:
        clips = data.toy_clips('heldout', 8, seconds=15.5)
    scored, ref = clips[:4], clips[4:8]
    oracle, silent = FakeLM(scored, oracle=True), FakeLM(scored, oracle=False)
    res = ev.eval_continuation(ReshapeVAE(), oracle, scored, ref, det, args, 'cpu')
    rows = res['rows']
    assert set(rows) >= {'real', 'vae', 'other clip', 'noise', 'calm steps=1 T=default'}
    calm = rows['calm steps=1 T=default']
    for k in ('note_acc', 'onset_r', 'key', 'fd'):  # the oracle continuation is the real one
        assert calm[k] == pytest.approx(rows['real'][k], abs=1e-6)
    assert calm['note_acc'] > rows['other clip']['note_acc']
    silent = ev.eval_continuation(ReshapeVAE(), silent, scored, ref, det, args, 'cpu')
    s = silent['rows']['calm steps=1 T=default']
    assert s['note_acc'] == 0 and s['onset_r'] == 0
    lo, hi = calm['note_acc_ci']           # its interval holds it; per-clip counts are kept
    assert lo <= calm['note_acc'] <= hi and len(calm['per_clip']) == len(scored)
    text = ev.report({'continuation': res})
    assert 'calm steps=1 T=default' in text and 'other clip' in text and 'note_acc_ci' in text


class Clock:
    """A stand-in for time.perf_counter that advances only when a fake model says it worked."""
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class TimedLM(FakeLM):
    """Generation costs backbone_ms per frame plus head_ms per head step and frame, on the clock."""
    backbone_ms, head_ms = 7.0, 0.5

    def __init__(self, clip, clock):
        super().__init__([clip], oracle=False)
        self.clock = clock

    def generate(self, prompt, n_frames, steps=1, **kw):
        self.clock.now += n_frames * (self.backbone_ms + steps * self.head_ms) / 1000
        return super().generate(prompt, n_frames, steps, **kw)


class TimedVAE(ReshapeVAE):
    def __init__(self, clock):
        super().__init__()
        self.clock = clock

    def decode(self, lat):
        self.clock.now += 0.3
        return super().decode(lat)


def test_speed_section_splits_backbone_and_head(monkeypatch):
    """eval_speed on a model whose costs are known, timed by a clock that only its work advances:
    the per-step head cost is the slope over 1 and 100 steps, the backbone the rest, real-time
    factors are ms per frame x frames per second, and VAE decoding of 10 s is timed alone."""
    clock = Clock()
    monkeypatch.setattr(ev, 'time', argparse.Namespace(perf_counter=clock.perf_counter))
    args = argparse.Namespace(prompt_seconds=1.0, temperature=[None])
    c = data.make_clip(data.clip_seed('heldout', 0), seconds=2.0)
    out = ev.eval_speed(TimedVAE(clock), TimedLM(c, clock), c, args, 'cpu')
    b, h, fr = TimedLM.backbone_ms, TimedLM.head_ms, ReshapeVAE.frame_rate
    for s in (1, 4, 100):
        assert out[f'ms_per_frame_steps{s}'] == pytest.approx(b + s * h)
        assert out[f'rtf_steps{s}'] == pytest.approx((b + s * h) / 1000 * fr)
    assert out['head_ms_per_step'] == pytest.approx(h)
    assert out['backbone_ms_per_frame'] == pytest.approx(b)
    assert out['ms_per_frame_30s_steps1'] == pytest.approx(b + h)
    assert out['vae_decode_rtf'] == pytest.approx(0.3 / 10)


def test_compare_runs_each_variant_and_tables_its_own_rows(tmp_path, monkeypatch):
    """--compare trains every ablation with its own flags at the same budget and VAE (train.py in a
    subprocess, skipped where a run exists), evaluates the TrigFlow run at --trigflow-steps and the
    default model at every temperature, and the table carries each variant's own numbers, with the
    reference rows of the first."""
    commands, evaluated = [], {}
    monkeypatch.setattr(ev.subprocess, 'run', lambda cmd, check: commands.append(cmd))
    (tmp_path / 'trigflow').mkdir()
    (tmp_path / 'trigflow' / 'calm.pt').write_bytes(b'')            # exists: not retrained

    def fake_evaluate(run_dir, a, sections):
        name = os.path.basename(run_dir)
        evaluated[name] = (a.steps, a.temperature, sections)
        k = list(ev.VARIANTS).index(name)
        rows = {'real': dict(note_acc=1.0 + k), 'vae': dict(note_acc=0.9 + k),
                'other clip': dict(note_acc=0.1 + k)}
        for steps in a.steps:
            for t in a.temperature:
                rows[f'calm steps={steps} T={ev.tlabel(t)}'] = dict(note_acc=k + t / 10 + steps)
        return {'continuation': {'settings': {}, 'rows': rows}}
    monkeypatch.setattr(ev, 'evaluate', fake_evaluate)
    args = argparse.Namespace(temperature=[None], compare_dir=str(tmp_path), retrain=False,
                              vae_from='out/v', lm_steps=77, seed=3, device='cpu', steps=[1, 4],
                              trigflow_steps=50)
    res, text = ev.run_compare(args)
    trained = {os.path.basename(c[c.index('--out') + 1]): c for c in commands}
    assert set(trained) == set(ev.VARIANTS) - {'trigflow'}
    for name, cmd in trained.items():
        assert cmd[1:8] == ['train.py', '--stage', 'lm', '--vae-from', 'out/v', '--out',
                            str(tmp_path / name)]
        assert cmd[cmd.index('--lm-steps') + 1] == '77' and cmd[cmd.index('--seed') + 1] == '3'
        assert cmd[-len(ev.VARIANTS[name]):] == ev.VARIANTS[name]
    assert evaluated['trigflow'] == ([50], [ev.SWEEP[0]], ('continuation',))
    assert evaluated['consistency'] == ([1, 4], ev.SWEEP, ('continuation',))
    assert evaluated['no_noise_aug'] == ([1, 4], [ev.SWEEP[0]], ('continuation',))
    rows = res['table']
    for name in ev.VARIANTS:
        k = list(ev.VARIANTS).index(name)
        temps = ev.SWEEP if name == 'consistency' else ev.SWEEP[:1]
        steps = [50] if name == 'trigflow' else [1, 4]
        mine = {key: r for key, r in rows.items() if key.startswith(name + ' ')}
        assert mine == {f'{name} steps={s} T={ev.tlabel(t)}': dict(note_acc=k + t / 10 + s)
                        for s in steps for t in temps}
    assert rows['(real)'] == dict(note_acc=1.0) and rows['(other clip)'] == dict(note_acc=0.1)
    assert 'trigflow steps=50 T=0.7' in text and '77 LM steps each' in text


def test_bootstrap_intervals_pool_resampled_clips():
    counts = [dict(n_ref=4, n_pitch=k % 5, n_hit=0, n_gen=5, n_in_key=k % 6, timbre=float(k % 2),
                   mel_db=1.0)
              for k in range(40)]
    s, ci = metrics.summarise(counts), metrics.bootstrap_ci(counts)
    for k in ('note_acc', 'key', 'timbre'):
        lo, hi = ci[f'{k}_ci']
        assert lo < s[k] < hi and hi - lo < 0.5
    # the same counts on every clip: every resample pools to the point estimate
    same = metrics.bootstrap_ci([counts[3]] * 40)
    assert same['note_acc_ci'] == [0.75, 0.75] and same['timbre_ci'] == [1.0, 1.0]
    # paired: the resamples depend only on the seed and the number of clips, so a row that is
    # better on every clip has a higher bound at both ends
    better = metrics.bootstrap_ci([dict(c, n_pitch=c['n_pitch'] + 1) for c in counts])
    assert all(b > a for a, b in zip(ci['note_acc_ci'], better['note_acc_ci']))


@pytest.mark.parametrize('rows', [1, 7])
def test_flops_of_a_linear_layer_are_two_per_multiply_add(rows):
    lin = torch.nn.Linear(24, 10)
    y, flops = ev.count_flops(lambda: lin(torch.randn(rows, 24)))
    assert y.shape == (rows, 10) and flops == 2 * 24 * 10 * rows
    # attention (a fused kernel on CPU): QK^T and AV, 2 x 2 x heads x queries x keys x head dim
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    assert ev.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))[1] \
        == 2 * 2 * 2 * 1 * 5 * 8


def tiny_lms():
    torch.manual_seed(0)
    c = calm.CALM(calm.Config(latent_dim=4, d_model=32, n_layers=2, n_heads=2, context=12,
                              short_context=3, short_layers=1, head_width=32, head_blocks=1))
    lms = {'calm': c}
    for kind in ('rq', 'delay'):
        m = rq.build(rq.Config(kind=kind, latent_dim=4, n_q=3, codebook_size=8, d_model=32,
                               n_layers=2, n_heads=2, context=12, depth_d=16, depth_layers=1,
                               depth_heads=2))
        m.rvq.codebooks.normal_()
        lms[kind] = m
    return {k: m.eval() for k, m in lms.items()}


def test_cost_parts_are_measured_inside_one_generation_and_add_up():
    """time_parts: the backbone and head calls are timed and counted inside model.generate, so
    backbone + head + the loop's own work = the frame; the FLOPs have known answers."""
    lms, n = tiny_lms(), 10
    parts = {k: ev.time_parts(m, n, 1, 0.8) for k, m in lms.items()}
    for k, p in parts.items():
        assert p['backbone_ms'] + p['head_ms'] + p['other_ms'] == pytest.approx(p['frame_ms'])
        assert p['other_ms'] >= 0 and p['backbone_ms'] > 0 and p['head_ms'] > 0
        assert p['frame_mflop'] == pytest.approx(p['backbone_mflop'] + p['head_mflop'])
    Q, V, d = 3, 8, 32
    # the delay LM: n + Q - 1 steps for n frames, each one Linear(d, Q V)
    assert parts['delay']['backbone_calls'] == parts['delay']['head_calls'] == (n + Q - 1) / n
    assert parts['delay']['head_mflop'] * 1e6 == pytest.approx(2 * d * Q * V * (n + Q - 1) / n)
    assert parts['rq']['head_calls'] == parts['calm']['backbone_calls'] == 1
    # CALM's head at 4 steps is 4 calls of the same network: 4x the FLOPs of one
    four = ev.time_parts(lms['calm'], n, 4, 0.8)
    assert four['head_mflop'] == pytest.approx(4 * parts['calm']['head_mflop'])
    assert four['backbone_mflop'] == pytest.approx(parts['calm']['backbone_mflop'])
    assert all(p.requires_grad for p in lms['calm'].parameters())   # left as it was


def test_mel_distance_ranks_truth_then_a_perturbed_copy_then_noise(clips):
    """metrics.mel_distance against the clip's own true continuation: the truth scores 0, sound
    far under it (60 dB floor) almost nothing, a copy one semitone off or 0.25 s late more, white
    noise most. Silence lies between (a paired distance counts a missing partial once and a wrong
    one twice: it can score like a late copy)."""
    rng = np.random.default_rng(0)
    a, b = int(T0 * SR), int(T1 * SR)
    for c in clips[:4]:
        ref = c.wav[a:b]
        d = lambda w: metrics.mel_distance(w, ref, SR)
        peak = np.abs(ref).max()
        faint = d(ref + 1e-4 * peak * rng.standard_normal(len(ref)))   # 80 dB down
        lag = int(0.25 * SR)
        semitone, late = d(transpose(c, 1).wav[a:b]), d(c.wav[a - lag:b - lag])
        noise = d(0.1 * rng.standard_normal(len(ref)))
        assert d(ref) == 0.0 and faint < 0.1 * min(semitone, late)
        assert max(semitone, late) < noise and faint < d(np.zeros_like(ref)) < noise
    # the continuation protocol carries it per clip and pools it as a mean
    s = metrics.summarise([metrics.score_continuation(c.wav, c, T0, T1) for c in clips[:3]])
    assert s['mel_db'] == 0.0


def test_quality_cost_figure_plots_matched_rows(tmp_path, capsys):
    """bench/figure.py on a made-up --table JSON: one marker per continuation row with a speed row
    (the T suffix dropped: two temperatures of one model are two points at one cost; steps=8 was
    never timed, references are lines), further right for more FLOPs; a JSON without the sections
    is a one-line error."""
    row = lambda acc: {'note_acc': acc, 'note_acc_ci': [acc - 0.05, acc + 0.05]}
    cont = {'a calm steps=1 T=default': row(0.6), 'a calm steps=1 T=0.5': row(0.65),
            'a calm steps=4 T=default': row(0.7), 'a calm steps=8 T=default': row(0.72),
            'b rq T=0.8': row(0.5), 'c delay T=0.8': row(0.62),
            '(real)': row(0.95), '(vae)': row(0.9), '(other clip)': row(0.05), '(noise)': {}}
    speed = {'a calm steps=1': {'frame_mflop': 2.0, 'frame_ms': 1.0},
             'a calm steps=4': {'frame_mflop': 5.0, 'frame_ms': 2.0},
             'b rq': {'frame_mflop': 20.0, 'frame_ms': 5.0},
             'c delay': {'frame_mflop': 2.2, 'frame_ms': 1.5},   # labels close
             'rq Q=2 (untrained)': {'frame_mflop': 10.0, 'frame_ms': 3.0}}
    path, out = tmp_path / 'table.json', tmp_path / 'fig.svg'
    path.write_text(json.dumps({'continuation': {'rows': cont}, 'speed': {'rows': speed}}))
    figure.main([str(path), '--out', str(out)])
    svg = ET.parse(out).getroot()
    ns = '{http://www.w3.org/2000/svg}'
    circles = svg.findall(f'{ns}circle')
    assert len(circles) == 5
    label = {t.text: t for t in svg.iter(f'{ns}text')}
    assert {'VAE round trip', 'other clip (chance)'} <= set(label)
    cx = {c.get('fill'): [] for c in circles}
    for c in circles:
        cx[c.get('fill')].append(float(c.get('cx')))
    # calm at 2 MFLOP (x2) and 5, delay at 2.2, rq at 20: left to right
    assert max(cx[figure.COLOURS['calm']]) > min(cx[figure.COLOURS['calm']])
    assert min(cx[figure.COLOURS['calm']]) < cx[figure.COLOURS['delay']][0] \
        < max(cx[figure.COLOURS['calm']]) < cx[figure.COLOURS['rq']][0]
    # no two point labels overlap (their boxes at the figure's ~5.5 px per character)
    boxes = []
    for t in svg.iter(f'{ns}text'):
        if t.get('font-size') == '9':
            x, n = float(t.get('x')), 5.5 * len(t.text)
            a = x - n if t.get('text-anchor') == 'end' else x
            boxes.append((a, a + n, float(t.get('y'))))
    assert len(boxes) == 5
    assert all(not (a0 < b1 and a1 < b0) or abs(y0 - y1) >= 10
               for i, (a0, b0, y0) in enumerate(boxes) for a1, b1, y1 in boxes[i + 1:])
    assert 'a calm steps=1 T=0.5' in capsys.readouterr().out
    path.write_text(json.dumps({'continuation': {'rows': cont}}))
    with pytest.raises(SystemExit, match='error'):
        figure.main([str(path), '--out', str(out)])
    with pytest.raises(SystemExit, match='error'):
        figure.main([str(tmp_path / 'missing.json'), '--out', str(out)])


def test_copy_bound_is_zero_for_a_repeating_signal_and_two_for_unrelated_frames():
    rng = np.random.default_rng(0)
    motif = rng.standard_normal((23, 4))
    # period 23 lies among the lags: copying it is exact
    assert copy_bound.copy_share(np.tile(motif, (5, 1)), range(12, 60)) < 1e-12
    # frames unrelated to each other: copying any lag doubles the variance
    noise = rng.standard_normal((4000, 4))
    assert copy_bound.copy_share(noise, range(12, 60)) == pytest.approx(2, rel=0.05)
