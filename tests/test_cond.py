"""Text conditioning and latent CFG: vocabulary, condition dropout, exact alpha = 0 / 1 limits,
the toy batch's descriptions, and sample.py --text end to end."""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_train import run  # noqa: E402

import calm  # noqa: E402
import corpus  # noqa: E402
import data  # noqa: E402
import metrics  # noqa: E402
import pipeline  # noqa: E402

torch.set_num_threads(1)
NT = len(data.VOCAB)


def tiny(**kw):
    base = dict(latent_dim=4, d_model=32, n_layers=2, n_heads=2, context=12, short_context=3,
                short_layers=1, head_width=32, head_blocks=2, head_batch_mul=2, n_text=NT)
    return calm.Config(**{**base, **kw})


def randomized(cfg, seed=0):
    """Non-zero weights everywhere (the head's init is the zero map), the padding row included: the
    null condition must not depend on it."""
    m = calm.CALM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


# --- vocabulary -----------------------------------------------------------------------------------

def test_descriptions_and_tokenizer():
    assert len(data.VOCAB) == 10 and len(set(data.VOCAB)) == 10
    for seed in range(12):
        clip = data.make_clip(seed, seconds=1.0)
        d = data.description(clip.meta)
        m = clip.meta
        assert d == data.clip_description(seed) == f"{m['family']} {m['mode']} {m['tempo_class']}"
        assert [data.VOCAB[i] for i in data.tokenize(d)] == d.split()
    assert data.tokenize('Flute  MINOR fast') == data.tokenize('flute minor fast')


@pytest.mark.parametrize('text', ['flute jazzy', 'piano', 'flute minor, fast'])
def test_unknown_word_lists_the_vocabulary(text):
    with pytest.raises(ValueError) as e:
        data.tokenize(text)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and all(w in msg for w in data.VOCAB)


# --- model ----------------------------------------------------------------------------------------

def test_unconditional_model_and_old_checkpoints_unchanged():
    cfg = tiny(n_text=0)
    m = calm.CALM(cfg)
    assert m.text is None and not any(k.startswith('text') for k in m.state_dict())
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ('n_text', 'cond_dropout')}
    assert calm.Config(**old).n_text == 0   # a checkpoint config without the new fields loads
    with pytest.raises(ValueError):
        m.generate(None, 2, text=calm.pad_text([[0]], NT))


@pytest.mark.parametrize('p', [0.2, 0.5])
def test_condition_dropout_rate(p):
    """Each sequence gets the null condition (c = 0) with probability cond_dropout: the count over N
    draws is within 5 binomial standard deviations of N p. Eval mode never drops."""
    m = calm.CALM(tiny(cond_dropout=p)).train()
    N = 20000
    text = torch.tensor([[0, 5, 7]]).expand(N, -1)
    torch.manual_seed(0)
    with torch.no_grad():
        c = m.condition(text)
    dropped = int((c == 0).all(1).sum())
    assert (c != 0).all(1).sum() + dropped == N          # rows are either kept whole or fully null
    assert abs(dropped - N * p) < 5 * math.sqrt(N * p * (1 - p)), dropped
    m.eval()
    assert (m.condition(text[:100]) != 0).all(1).all()


def test_condition_reaches_every_backbone_position_and_trains():
    m = randomized(tiny(cond_dropout=0.0)).train()   # MAR's zero head would pass no gradient back
    x = torch.randn(2, 6, 4)
    seen = {}
    m.long.blocks[0].register_forward_pre_hook(lambda mod, inp: seen.__setitem__('h', inp[0]))
    text = calm.pad_text([[0, 5, 7], []], NT)
    torch.manual_seed(0)
    loss, _ = m(x, step=0, text=text)
    h_text = seen['h']
    torch.manual_seed(0)
    m(x, step=0)
    c = m.condition(text)
    # start frame too
    assert torch.allclose(h_text - seen['h'], c[:, None].expand(-1, 6, -1), atol=1e-6)
    loss.backward()
    assert m.text.weight.grad[[0, 5, 7]].abs().sum() > 0 and m.text.weight.grad[NT].abs().sum() == 0


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.integers(1, 3))
def test_guidance_limits_are_exact(seed, with_prompt, B):
    """Latent CFG: alpha = 1 is exactly conditional sampling, alpha = 0 exactly unconditional
    sampling (no text; for a batch from nothing, the empty description, which is bit-identical to no
    text), same seed; the noise draws are the same in every mode (generator states agree)."""
    m = randomized(tiny(), seed)
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(NT, (int(torch.randint(1, 4, (1,), generator=g)),),
                         generator=g).tolist() for _ in range(B)]
    text = calm.pad_text(ids, NT)
    prompt = torch.randn(B, 5, 4, generator=g) if with_prompt else None

    def gen(**kw):
        gg = torch.Generator().manual_seed(seed)
        # 14 frames: past the 12-frame context
        out = m.generate(prompt, 14, steps=2, generator=gg, **kw)
        return out, gg.get_state()

    cond, s_cond = gen(text=text)
    uncond, s_uncond = gen(text=calm.pad_text([[]] * B, NT))
    if prompt is not None or B == 1:   # no text at all: the same samples bit for bit
        assert torch.equal(gen()[0], uncond)
    a1, s1 = gen(text=text, guidance=1.0)
    a0, s0 = gen(text=text, guidance=0.0)
    a3, _ = gen(text=text, guidance=3.0)
    assert torch.equal(a1, cond) and torch.equal(a0, uncond)
    assert all(torch.equal(s_cond, s) for s in (s_uncond, s1, s0))
    assert not torch.equal(a3, cond)                    # guidance changes the samples


# --- training data --------------------------------------------------------------------------------

def test_toy_batch_carries_each_windows_description():
    """Clip i's latents are filled with i, so every window says which clip it came from."""
    n = 7
    texts = [data.tokenize(data.clip_description(data.clip_seed('train', i))) for i in range(n)]
    latents = [torch.full((20 + i, 3), float(i)) for i in range(n)]
    for step in range(5):
        x, ids = corpus.window_batch(latents, step, 0, 16, 10, texts=texts)
        # same windows as without text
        assert torch.equal(x, corpus.window_batch(latents, step, 0, 16, 10))
        for w, row in zip(x, ids):
            i = int(w[0, 0])
            assert [t for t in row.tolist() if t != NT] == texts[i]
        # pure function of (seed, step)
        x2, ids2 = corpus.window_batch(latents, step, 0, 16, 10, texts=texts)
        assert torch.equal(x, x2) and torch.equal(ids, ids2)


# --- sample.py ------------------------------------------------------------------------------------

def test_toy_run_is_text_conditioned(tiny_run):
    _, model = pipeline.load(str(tiny_run))
    assert model.cfg.n_text == NT and model.cfg.cond_dropout == 0.2


def test_sample_text_from_nothing(tiny_run, tmp_path):
    out = tmp_path / 'gen.wav'
    r = run('sample.py', '--text', 'flute minor fast', '--guidance', '2', '--seconds', '1.5',
            '--ckpt', str(tiny_run), '--out', str(out))
    assert 'real-time factor' in r.stdout and 'guidance 2' in r.stdout
    wav, sr = sf.read(out)
    vae, _ = pipeline.load(str(tiny_run))
    assert sr == vae.cfg.sample_rate and len(wav) == round(1.5 * vae.frame_rate) * vae.hop
    assert np.isfinite(wav).all()


@pytest.mark.parametrize('argv', [['--text', 'flute jazzy minor'], []])
def test_sample_text_errors_are_one_line(tiny_run, tmp_path, argv):
    out = tmp_path / 'x.wav'
    r = run('sample.py', *argv, '--ckpt', str(tiny_run), '--out', str(out), check=False)
    assert r.returncode == 1
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob('*'))
    if argv:
        assert "'jazzy'" in r.stderr and all(w in r.stderr for w in data.VOCAB)


# --- metrics.py detectors -------------------------------------------------------------------------

def test_text_detectors_on_real_clips():
    """The mode and tempo detectors on real held-out clips (the 'real' ceiling row of evaluate.py
    --guidance-sweep): measured 0.94 / 1.00 on 48 clips; here 16 clips, with margin."""
    clips = data.toy_clips('heldout', 16, seconds=6.0)
    mode = np.mean([metrics.detect_mode(c.wav, data.SR) == c.meta['mode'] for c in clips])
    tempo = np.mean([metrics.detect_tempo_class(c.wav, data.SR) == c.meta['tempo_class']
                     for c in clips])
    assert mode >= 0.75 and tempo >= 0.9, (mode, tempo)
    assert metrics.detect_mode(np.zeros(data.SR, np.float32), data.SR) is None
    assert metrics.detect_tempo_class(np.zeros(data.SR, np.float32), data.SR) is None
