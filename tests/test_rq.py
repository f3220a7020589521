"""Tests of rq.py (the discrete baselines): RVQ codebook learning, the depth Transformer and delay
pattern, causality, cached generation against the full forward pass, sampling, and train.py /
sample.py end to end."""
import dataclasses
import json
import os
import socket
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_train import run, sample_in_process, tiny_recipes, train_main  # noqa: E402

import calm  # noqa: E402
import data  # noqa: E402
import pipeline  # noqa: E402
import rq  # noqa: E402

torch.set_num_threads(1)
HP = settings(max_examples=15, deadline=None)


def tiny(kind='rq', **kw):
    base = dict(kind=kind, latent_dim=4, n_q=3, codebook_size=8, d_model=32, n_layers=2, n_heads=2,
                context=12,
                depth_d=16, depth_layers=2, depth_heads=2, rvq_init_frames=512, rvq_steps=5,
                rvq_batch=256)
    return rq.Config(**{**base, **kw})


def randomized(cfg, seed=0):
    """Non-zero weights everywhere and random codebooks, so every test sees a real network."""
    m = rq.build(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        scale = 1 + torch.arange(cfg.n_q)[:, None, None]   # coarse to fine, as a fitted RVQ
        m.rvq.codebooks.copy_(torch.randn(m.rvq.codebooks.shape, generator=g) / scale)
    return m.eval()


def random_rvq(Q, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    r = rq.RVQ(D, Q, K)
    r.codebooks.copy_(torch.randn(Q, K, D, generator=g))
    return r.eval(), g


# --- RVQ ------------------------------------------------------------------------------------------

@HP
@given(st.integers(1, 5), st.integers(2, 16), st.integers(1, 6), st.integers(0, 10_000))
def test_quantised_vector_is_the_sum_of_the_chosen_codewords(Q, K, D, seed):
    rvq, g = random_rvq(Q, K, D, seed)
    x = 2 * torch.randn(50, D, generator=g)
    x_q, codes, _ = rvq(x)
    assert codes.shape == (50, Q) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < K
    manual = sum(rvq.codebooks[q][codes[:, q]] for q in range(Q))
    assert torch.allclose(x_q, manual, atol=1e-5) and torch.allclose(rvq.decode(codes), manual)
    assert torch.equal(rvq.encode(x), codes)
    # greedy: level q's codeword is the nearest one to what the levels before it left over
    r = x - sum([rvq.codebooks[p][codes[:, p]] for p in range(Q - 1)], torch.zeros_like(x))
    dists = ((r[:, None] - rvq.codebooks[Q - 1][None]) ** 2).sum(-1)
    assert torch.allclose(dists.gather(1, codes[:, -1:])[:, 0], dists.min(1).values, atol=1e-4)


@HP
@given(st.integers(0, 10_000))
def test_residual_shrinks_level_by_level_after_kmeans_init(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, 4, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.2])
    rvq = rq.RVQ(4, 4, 16)
    stats = rq.fit(rvq, x, tiny(n_q=4, codebook_size=16, rvq_steps=0, rvq_init_frames=2000),
                   seed=seed, log=None)
    mse = [float((x ** 2).mean())] + [s['residual_mse'] for s in stats]
    assert all(b < a for a, b in zip(mse, mse[1:])), mse
    assert all(s['usage'] > 0.9 for s in stats)


def test_straight_through_gradient_and_commitment_loss():
    rvq, g = random_rvq(3, 8, 5, 0)
    x = torch.randn(20, 5, generator=g, requires_grad=True)
    w = torch.randn(20, 5, generator=g)
    x_q, codes, commit = rvq(x)
    (x_q * w).sum().backward()
    assert torch.equal(x.grad, w)                     # straight through: d x_q / d x = identity
    # commitment = mean over levels of the squared error each level leaves (its residual after it)
    with torch.no_grad():
        left = [((x - rvq.decode(codes[:, :q + 1])) ** 2).mean() for q in range(3)]
    assert commit.item() == pytest.approx(float(sum(left) / 3), rel=1e-5)
    x.grad = None
    rvq(x)[2].backward()                              # and it pulls x towards its quantised value
    assert x.grad.abs().sum() > 0


@HP
@given(st.integers(0, 10_000), st.floats(0.5, 0.99))
def test_ema_step_moves_a_used_codeword_towards_the_mean_of_its_vectors(seed, decay):
    rvq, g = random_rvq(1, 6, 3, seed)
    rvq.decay = decay
    rvq.cluster_size.fill_(10.0)                      # all alive: no restart in this step
    rvq.embed_sum.copy_(rvq.codebooks * 10.0)
    x = torch.randn(60, 3, generator=g) * 2
    idx = rq.nearest(x, rvq.codebooks[0])
    old = rvq.codebooks[0].clone()
    rvq.ema_update(0, x, idx, np.random.default_rng(0))
    for k in idx.unique():
        mean = x[idx == k].mean(0)
        n = (idx == k).sum()
        w_old, w_new = decay * 10.0, (1 - decay) * n
        expected = (w_old * old[k] + w_new * mean) / (w_old + w_new)
        assert torch.allclose(rvq.codebooks[0][k], expected, atol=1e-4)
        assert (rvq.codebooks[0][k] - mean).norm() < (old[k] - mean).norm()


def test_unused_codes_are_restarted_on_input_vectors():
    rvq, g = random_rvq(1, 4, 2, 0)
    rvq.codebooks[0, 3] = 100.0                       # far from every input: never chosen
    rvq.cluster_size.fill_(50.0)
    rvq.embed_sum.copy_(rvq.codebooks * 50.0)
    x = torch.randn(200, 2, generator=g)
    rng = np.random.default_rng(0)
    for _ in range(300):                              # its usage decays until it falls under the
                                                      # threshold
        idx = rq.nearest(x, rvq.codebooks[0])
        assert (idx != 3).all()
        rvq.ema_update(0, x, idx, rng)
        if rvq.restarts:
            break
    assert rvq.restarts == 1
    assert (rvq.codebooks[0, 3] == x).all(1).any()    # now sits on an input vector, with the mean
                                                      # usage
    assert rvq.cluster_size[0, 3] == pytest.approx(200 / 4, rel=1e-4)


def distortion(x, codebook):
    return float(((x - codebook[rq.nearest(x, codebook)]) ** 2).sum(1).mean())


def test_kmeans_lowers_the_distortion_from_its_own_initialisation():
    """Lloyd's iterations from the V random rows k-means starts from (the same rows for any number
    of iterations: the first draw of the same generator) never raise the mean squared distance to
    the nearest centroid, and 30 of them lower it well below the start; and rq.fit's k-means (its
    default iterations, no EMA step) ends far below that start too."""
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [3.0, 1.0, 0.5, 0.2])
    d = [distortion(x, rq.kmeans(x, 16, iters, np.random.default_rng(1))[0])
         for iters in (0, 1, 2, 5, 30)]
    assert all(b <= a + 1e-6 for a, b in zip(d, d[1:])), d
    assert d[-1] < 0.7 * d[0], d
    start = rq.kmeans(x, 16, 0, np.random.default_rng(1))[0]
    assert torch.equal(start, x[torch.from_numpy(np.random.default_rng(1).choice(3000, 16,
                                                                                 replace=False))])
    cfg = tiny(n_q=1, codebook_size=16, rvq_steps=0, rvq_init_frames=3000)
    assert cfg.rvq_kmeans_iters == rq.Config.rvq_kmeans_iters
    rvq = rq.RVQ(4, 1, 16)
    rq.fit(rvq, x, cfg, seed=0, log=None)
    init = x[torch.from_numpy(np.random.default_rng([0, 1, 0]).choice(3000, 16, replace=False))]
    assert distortion(x, rvq.codebooks[0]) < 0.7 * distortion(x, init)


def test_fit_is_deterministic_and_nested_across_levels():
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(1))
    fits = {}
    for Q in (2, 3, 3):
        r = rq.RVQ(4, Q, 8)
        rq.fit(r, x, tiny(n_q=Q), seed=5, log=None)
        fits.setdefault(Q, []).append(r.codebooks)
    assert torch.equal(fits[3][0], fits[3][1])
    assert torch.equal(fits[2][0], fits[3][0][:2])   # a Q-level fit = the first Q levels of a
                                                     # deeper one


def test_code_stats():
    codes = torch.tensor([[0, 1], [1, 1], [2, 1], [3, 1]])
    s = rq.code_stats(codes, 4)
    assert s[0] == {'usage': 1.0, 'entropy_bits': pytest.approx(2.0)}
    assert s[1] == {'usage': 0.25, 'entropy_bits': pytest.approx(0.0)}


# --- sampling and the delay pattern ---------------------------------------------------------------

@HP
@given(st.integers(0, 10_000), st.integers(2, 12))
def test_temperature_to_zero_gives_the_argmax(seed, K):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, K, generator=g) * 3
    top2 = logits.topk(2, -1).values
    logits = logits[(top2[:, 0] - top2[:, 1]) > 0.05]           # a clear winner in every row
    best = logits.argmax(-1)
    assert torch.equal(rq.sample_logits(logits, 0.0), best)
    assert torch.equal(rq.sample_logits(logits, 1e-4, generator=g), best)
    assert torch.equal(rq.sample_logits(logits, 1.0, top_k=1, generator=g), best)


def test_sampling_follows_the_softmax_and_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(rq.sample_logits(logits, 1.0, generator=g), minlength=4) / 20000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)
    freq = torch.bincount(rq.sample_logits(logits, 0.5, top_k=2, generator=g), minlength=4) / 20000
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], (logits[0, :2] / 0.5).softmax(-1),
                                                  atol=0.015)


@pytest.mark.parametrize('k', [1, 3])
def test_top_k_keeps_exactly_k_codes_when_logits_tie(k):
    """Ten tied logits (a threshold at the k-th would keep all ten): exactly k distinct codes are
    ever sampled, the same k in every row (topk's indices), each about equally often."""
    logits = torch.zeros(4000, 10)
    logits[:, 7] = -1.0   # one code below the tie
    g = torch.Generator().manual_seed(0)
    codes = rq.sample_logits(logits, 1.0, top_k=k, generator=g)
    assert codes.shape == (4000,) and len(codes.unique()) == k and (codes != 7).all()
    freq = torch.bincount(codes, minlength=10)[codes.unique()] / 4000
    assert torch.allclose(freq, torch.full((k,), 1 / k), atol=0.04)
    lo = torch.randn(5, 3, 10, generator=g).round()   # batched logits with ties: shape kept
    assert rq.sample_logits(lo, 0.7, top_k=k, generator=g).shape == (5, 3)


def test_delay_pattern_exact_example():
    """MusicGen's delay pattern (arXiv 2306.05284 §2.2) on 3 frames a, b, c of Q = 3 levels: step t
    holds code q of frame t - q, '-' (the pad id 9) where there is none."""
    codes = torch.tensor([[[1, 2, 3], [4, 5, 6], [7, 8, 0]]])      # frames a = 1 2 3, b, c
    _ = 9
    assert rq.delay(codes, 9).tolist() == [[[1, _, _],
                                            [4, 2, _],
                                            [7, 5, 3],
                                            [_, 8, 6],
                                            [_, _, 0]]]
    assert torch.equal(rq.undelay(rq.delay(codes, 9)), codes)


@HP
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 5), st.integers(0, 10_000))
def test_delay_pattern_round_trips(B, S, Q, seed):
    codes = torch.randint(0, 7, (B, S, Q), generator=torch.Generator().manual_seed(seed))
    d = rq.delay(codes, 7)
    assert d.shape == (B, S + Q - 1, Q)
    for t in range(S + Q - 1):
        for q in range(Q):
            assert (d[:, t, q] == (codes[:, t - q, q] if 0 <= t - q < S else 7)).all()
    assert torch.equal(rq.undelay(d), codes)


# --- the language models --------------------------------------------------------------------------

def codes_like(cfg, B, S, seed=0):
    return torch.randint(0, cfg.codebook_size, (B, S, cfg.n_q),
                         generator=torch.Generator().manual_seed(seed))


def test_depth_transformer_is_causal_across_levels_and_backbone_across_frames():
    cfg = tiny(n_q=4)
    m = randomized(cfg)
    codes = codes_like(cfg, 2, 8)
    base = m.logits(codes)
    t, k = 5, 1
    changed = codes.clone()
    changed[:, t, k] = (changed[:, t, k] + 1) % cfg.codebook_size
    out = m.logits(changed)
    assert torch.equal(out[:, :t], base[:, :t])                 # earlier frames never see frame t
    assert torch.equal(out[:, t, :k + 1], base[:, t, :k + 1])   # levels <= k ignore code k of their
                                                                # frame
    assert not torch.allclose(out[:, t, k + 1:], base[:, t, k + 1:])   # later levels read it
    assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])         # later frames read it


def stream_logits(m, codes):
    """Logits of every code through the cached path: backbone steps and depth steps, teacher-forced.
    """
    B, S, Q = codes.shape
    state, prev, out = m.new_state(B), None, []
    for s in range(S):
        z = m.step_backbone(prev, state)
        cache, levels = m.depth.new_cache(B), []
        for k in range(Q):
            levels.append(m.depth.step(z, None if k == 0 else codes[:, s, k - 1], k, cache))
        out.append(torch.stack(levels, 1))
        prev = codes[:, s]
    return torch.stack(out, 1)


@pytest.mark.parametrize('S', [7, 20])   # 20 > context 12: the ring-buffer KV cache rolls
def test_cached_rq_path_equals_the_full_forward(S):
    cfg = tiny()
    m = randomized(cfg)
    codes = codes_like(cfg, 2, S)
    with torch.no_grad():
        assert torch.allclose(stream_logits(m, codes), m.logits(codes), atol=1e-4)


@pytest.mark.parametrize('kind', ['rq', 'delay'])
def test_generation_at_temperature_zero_is_the_argmax_of_the_full_forward(kind):
    cfg = tiny(kind)
    m = randomized(cfg)
    P, n = 4, 9
    prompt = codes_like(cfg, 2, P, seed=3)
    new = m.generate_codes(prompt, n, 0.0, 0, None, m.new_state(2))
    assert new.shape == (2, n, cfg.n_q)
    seq = torch.cat([prompt, new], 1)
    with torch.no_grad():
        if kind == 'rq':
            assert torch.equal(m.logits(seq).argmax(-1)[:, P:], new)
        else:   # step t = f + q emits code q of frame f; steps <= P + n read no frame past the end
            best = m.logits(rq.delay(seq, cfg.codebook_size)).argmax(-1)
            for f in range(P, P + n):
                for q in range(cfg.n_q):
                    if f + q <= P + n:
                        assert torch.equal(best[:, f + q, q], new[:, f - P, q]), (f, q)


def level0_logits(m, z):
    """The logits of a frame's first code given z [N, d] (both LMs: its level-0 distribution)."""
    if m.kind == 'rq':
        return m.depth.step(z, None, 0, m.depth.new_cache(z.shape[0]))
    return m.heads(z).view(z.shape[0], m.cfg.n_q, -1)[:, 0]


@pytest.mark.parametrize('kind', ['rq', 'delay'])
def test_sample_head_and_generate_honour_the_temperature(kind):
    """sample_head draws a frame's first code from softmax(logits / temperature): 20000 draws from
    one z follow it at temperatures 0.5 and 2 (two different distributions), and temperature 0 is
    the argmax; generate passes its temperature down (0: the greedy codes of the full forward)."""
    cfg = tiny(kind)
    m = randomized(cfg)
    z = m.step_backbone(None, m.new_state(1)).expand(20000, -1)
    logits = level0_logits(m, z[:1])[0]
    g = torch.Generator().manual_seed(0)
    for temp in (0.5, 2.0):
        codes = m.sample_head(z, temperature=temp, generator=g)[:, 0]
        freq = torch.bincount(codes, minlength=cfg.codebook_size) / len(codes)
        assert torch.allclose(freq, (logits / temp).softmax(-1), atol=0.015), (temp, freq)
    assert (m.sample_head(z[:5], temperature=0.0)[:, 0] == logits.argmax()).all()
    prompt = torch.randn(2, 4, cfg.latent_dim, generator=g)
    greedy = m.generate_codes(m.rvq.encode(prompt), 5, 0.0, 0, None, m.new_state(2))
    assert torch.equal(m.generate(prompt, 5, temperature=0.0), m.rvq.decode(greedy))


@pytest.mark.parametrize('kind', ['rq', 'delay'])
def test_generate_returns_dequantised_latents_and_checks_its_arguments(kind):
    cfg = tiny(kind, n_text=3)
    m = randomized(cfg)
    prompt = torch.randn(2, 5, cfg.latent_dim)
    g = torch.Generator().manual_seed(0)
    seen = []   # on_frame gets each new frame once all its codes are sampled
    out = m.generate(prompt, 6, generator=g, on_frame=seen.append)
    assert out.shape == (2, 6, cfg.latent_dim)
    assert torch.equal(torch.stack(seen, 1), out)
    # every new frame is a sum of one codeword per level
    g0 = torch.Generator().manual_seed(0)
    codes = m.generate_codes(m.rvq.encode(prompt), 6, cfg.temperature, 0, g0, m.new_state(2))
    assert torch.allclose(out, m.rvq.decode(codes))
    text = calm.pad_text([[0, 1], [2]], 3)
    out = m.generate(None, 3, text=text, guidance=2.0, generator=g)
    assert out.shape == (2, 3, cfg.latent_dim)
    with pytest.raises(ValueError, match='CALM option'):
        m.generate(prompt, 2, steps=4)


@pytest.mark.parametrize('kind', ['rq', 'delay'])
def test_training_step_lowers_the_loss_and_reaches_the_backbone(kind):
    cfg = tiny(kind)
    torch.manual_seed(0)
    m = rq.build(cfg)
    x = torch.randn(1000, cfg.latent_dim)
    rq.fit(m.rvq, x, cfg, log=None)
    batch = x[:8 * 12].view(8, 12, -1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss, stats = m(batch)
        opt.zero_grad()
        loss.backward()
        assert m.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        opt.step()
        first = first or stats['loss']
    assert stats['loss'] < 0.7 * first
    mse = 'val_mse' if kind == 'rq' else 'val_mse_true_lower'   # the delay LM's: named for what
    assert set(m.held_out(batch)) == {'val_ce', mse, 'val_var'}   # it is


def test_a_checkpoint_with_the_old_depth_block_keys_loads_the_same_model():
    """Before the depth Transformer was made of transformer.Block, each of its blocks held qkv and
    proj at its top level: such a state dict loads into the same model (same tensors and logits)."""
    cfg = tiny()
    m = randomized(cfg)
    old = {k.replace('.attn.', '.') if k.startswith('depth.blocks.') else k: v
           for k, v in m.state_dict().items()}
    assert 'depth.blocks.0.qkv.weight' in old and 'backbone.blocks.0.attn.qkv.weight' in old
    m2 = rq.build(cfg).eval()
    m2.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    codes = codes_like(cfg, 2, 5)
    with torch.no_grad():
        assert torch.equal(m.logits(codes), m2.logits(codes))


def test_config_checks_and_parameter_budget():
    for bad in (dict(n_q=0), dict(codebook_size=1), dict(kind='vq'), dict(kind='delay', n_q=20),
                dict(depth_d=30, depth_heads=4)):
        with pytest.raises(ValueError):
            rq.check(tiny(**bad))
    with pytest.raises(ValueError, match='do not fit'):
        rq.check(tiny(codebook_size=64), n_frames=50)
    # the toy RQ-Transformer's depth Transformer is sized like a 256 x 3 CALM head (within 10 %)
    big = dataclasses.replace(calm.TOY, head_width=256, head_blocks=3)
    head = calm.n_params(calm.CALM(big).head)
    depth = calm.n_params(rq.build(rq.config_like(calm.TOY)).depth)
    assert abs(depth - head) < 0.1 * head
    # the same backbone as CALM's, fed code embeddings instead of Linear(x)
    m = rq.build(rq.config_like(calm.TOY))
    c = calm.CALM(calm.TOY)
    without_input = lambda t: calm.n_params(t) - calm.n_params(t.inp)
    assert without_input(m.backbone) == without_input(c.long)


# --- train.py / sample.py end to end --------------------------------------------------------------

TINY_RQ = ['--clips', '6', '--lm.d_model=32', '--lm.n_layers=1', '--lm.n_heads=2',
           '--lm.context=12', '--lm.depth_d=16', '--lm.depth_layers=1', '--lm.depth_heads=2',
           '--lm.rvq_init_frames=1024',
           '--lm.rvq_steps=3', '--lm.rvq_batch=512', '--levels', '3', '--codebook-size', '16',
           '--log-every', '1']


@pytest.fixture(scope='module', params=['rq', 'delay'])
def discrete_run(request, tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp(f'tiny_{request.param}')
    mp = pytest.MonkeyPatch()
    tiny_recipes(mp)
    train_main(['--stage', 'lm', '--vae-from', str(tiny_run), '--out', str(out), '--model',
                request.param, '--lm-steps', '3', *TINY_RQ])
    mp.undo()
    return request.param, out


def test_discrete_run_writes_a_checkpoint_that_sample_continues(discrete_run, tmp_path):
    kind, out = discrete_run
    ck = torch.load(out / 'calm.pt', weights_only=False)
    assert ck['kind'] == kind and ck['config']['n_q'] == 3 and ck['step'] == 3
    recs = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [len(r['levels']) for r in recs if r['stage'] == 'rvq'] == [3]
    assert [r['step'] for r in recs if 'val_ce' in r] == [3]
    vae, model = pipeline.load(str(out))
    assert isinstance(model, rq.DiscreteLM) and model.rvq.codebooks.abs().sum() > 0
    import soundfile as sf
    prompt = tmp_path / 'p.wav'
    sf.write(prompt, 0.2 * np.sin(np.arange(12000) / 10), 24000)
    r = run('sample.py', str(prompt), '--ckpt', str(out), '--seconds', '1', '--out',
            str(tmp_path / 'o.wav'), '--top-k', '4', '--temperature', '1.0')
    assert f'{kind} LM' in r.stdout
    wav, sr = sf.read(tmp_path / 'o.wav')
    assert len(wav) == (12000 // vae.hop + round(vae.frame_rate)) * vae.hop
    # the continuation the library makes with the same seed, temperature and top-k
    ref = sample_in_process(out, prompt, round(vae.frame_rate), temperature=1.0, top_k=4)[0]
    assert np.abs(wav - ref).max() < 1e-4
    # a CALM-only flag on a discrete checkpoint: one line, nothing written
    r = run('sample.py', str(prompt), '--ckpt', str(out), '--steps', '4', '--out',
            str(tmp_path / 'x.wav'), check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert 'CALM option' in r.stderr
    assert not (tmp_path / 'x.wav').exists()


@pytest.mark.parametrize('flags, msg', [
    (['--model', 'delay', '--no-noise-aug'], 'CALM-only'),
    (['--model', 'rq', '--lm-sct-lr', '1'], 'CALM-only'),
    (['--levels', '4'], 'discrete LMs'),
    (['--model', 'rq', '--levels', '0'], 'Q >= 1'),
    (['--model', 'rq', '--codebook-size', '100000'], 'do not fit'),
])
def test_train_bad_discrete_flags_fail_with_a_message(tiny_run, tmp_path, flags, msg):
    with pytest.raises(SystemExit, match=msg):
        train_main(['--stage', 'lm', '--vae-from', str(tiny_run), '--out', str(tmp_path / 'o'),
                    '--lm-steps', '1', *flags, '--clips', '6'])
    assert not (tmp_path / 'o' / 'calm.pt').exists()


def test_train_bad_discrete_flag_is_one_line_without_traceback(tiny_run, tmp_path):
    r = run('train.py', '--stage', 'lm', '--vae-from', str(tiny_run), '--out', str(tmp_path / 'o'),
            '--model', 'rq', '--head-loss', 'trigflow', '--clips', '6', check=False)
    assert r.returncode != 0 and 'CALM-only' in r.stderr
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_discrete_resume_equals_uninterrupted(tiny_run, tmp_path, monkeypatch):
    tiny_recipes(monkeypatch)
    common = ['--stage', 'lm', '--vae-from', str(tiny_run), '--model', 'rq', '--lm-steps', '4',
              '--ckpt-every', '1', *TINY_RQ]
    train_main(['--out', str(tmp_path / 'full'), *common])
    train_main(['--out', str(tmp_path / 'cut'), '--stop-after', '2', *common])
    train_main(['--out', str(tmp_path / 'cut'), '--resume', *common])
    a, b = (torch.load(tmp_path / n / 'calm.pt', weights_only=False) for n in ('full', 'cut'))
    assert a['step'] == b['step'] == 4
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    # fitted once
    assert sum(1 for line in open(tmp_path / 'cut' / 'log.jsonl') if '"rvq"' in line) == 1


def test_discrete_ddp_replicas_stay_identical(tiny_run, tmp_path):
    out = tmp_path / 'ddp'
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    run('-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', 'train.py',
        '--stage', 'lm', '--vae-from', str(tiny_run), '--out', str(out), '--model', 'delay',
        '--lm-steps', '2', *TINY_RQ)
    recs = map(json.loads, open(out / 'log.jsonl'))
    diffs = [r['replica_max_abs_diff'] for r in recs if 'replica_max_abs_diff' in r]
    assert diffs == [0.0]


def test_evaluate_table_end_to_end(tiny_run, discrete_run):
    """evaluate.py --table on a CALM run and a discrete run: codec rows (bits, quality),
    continuation rows of both kinds, speed rows with the Q sweep; the discrete LM's codebooks are
    the table's own fit."""
    import evaluate
    kind, out = discrete_run
    try:
        res = evaluate.main(['--table', str(tiny_run), str(out), '--clips', '2', '--clips-cont',
                             '2', '--timbre-fit',
                             '5', '--continue-seconds', '1', '--steps', '1', '--codec-levels',
                             '1,3', '--codebook-size',
                             '16', '--speed-seconds', '0.5', '--speed-rounds', '1',
                             '--discrete-temperatures', '0.5'])
    finally:
        torch.set_flush_denormal(False)  # evaluate.main sets it process-wide; hypothesis needs
                                         # subnormals
    codec = res['codec']
    assert list(codec['rows']) == ['gaussian (VAE)', 'rvq Q=1 V=16', 'rvq Q=3 V=16']
    assert [r['bits'] for r in list(codec['rows'].values())[1:]] == [4.0, 12.0]
    assert codec['rows']['rvq Q=3 V=16']['lat_mse'] < codec['rows']['rvq Q=1 V=16']['lat_mse']
    assert len(codec['levels']) == 3 and codec['lm_codebooks_max_abs_diff'] == {out.name: 0.0}
    rows = res['continuation']['rows']
    assert f'{tiny_run.name} calm steps=1 T=default' in rows
    assert f'{out.name} {kind} T=0.5' in rows and '(real)' in rows
    speed = res['speed']['rows']
    assert speed[f'{tiny_run.name} calm steps=1']['head_x'] == 1.0
    assert {f'{k} Q={q} (untrained)' for k in ('rq', 'delay') for q in (1, 3)} <= set(speed)
    assert all(np.isfinite(v) and v > 0 for r in speed.values() for k, v in r.items()
               if k not in ('h', 'other_ms'))
    for r in speed.values():   # the parts were timed inside the frame they add up to
        assert r['other_ms'] >= 0 and r['frame_mflop'] == pytest.approx(r['backbone_mflop']
                                                                        + r['head_mflop'])


@pytest.mark.parametrize('kind', ['calm', 'rq', 'delay'])
def test_one_validation_measure_sees_only_the_true_past(kind):
    """pipeline.validation's val_next_mse: every kind's greedy next frame from generate. Changing
    frame s and everything after it leaves the prediction of frame s as it was (the delay LM's
    teacher-forced val_mse_true_lower reads frame s's true lower levels: not this measure); for
    CALM and RQ it equals their teacher-forced val_mse at the same frames."""
    if kind == 'calm':
        cfg = calm.Config(latent_dim=4, d_model=32, n_layers=2, n_heads=2, context=12,
                          short_context=0, head_width=32, head_blocks=1)
        torch.manual_seed(0)
        m = calm.CALM(cfg).eval()
        with torch.no_grad():
            for p in m.head.parameters():
                p.add_(0.1 * torch.randn_like(p))
    else:
        cfg = tiny(kind)
        m = randomized(cfg)
    x = torch.randn(3, 12, 4, generator=torch.Generator().manual_seed(1))
    pos, pred = pipeline.next_frames(m, x, every=2)
    assert pos == [2, 4, 6, 8, 10] and pred.shape == (3, 5, 4)
    for i, s in enumerate(pos):
        y = x.clone()
        y[:, s:] = torch.randn(3, 12 - s, 4)
        assert torch.allclose(pipeline.next_frames(m, y, every=2)[1][:, i], pred[:, i], atol=1e-5)
    stats = pipeline.validation(m, x)
    assert stats['val_next_mse'] > 0 and 'val_var' in stats
    if kind == 'calm':
        z = m.conditioning(x, x)
        tf = m.sample_head(z.flatten(0, 1), 1, 0.0).view_as(x)
    elif kind == 'rq':
        z = m.backbone(m.rvq.encode(x))
        tf = m.rvq.decode(m.sample_head(z.flatten(0, 1), temperature=0.0)).view_as(x)
    else:
        return
    assert torch.allclose(tf[:, pos], pred, atol=1e-4)


def test_discrete_lm_trains_on_an_end_to_end_rvq_codec(tmp_path):
    """train.py --vae.bottleneck=rvq trains the codec with its RVQ (vae.py); --model rq on it
    takes the codec's codebooks, so the LM's codes of the cached latents are the codec's own;
    the run samples; CALM on it and codes that do not fit stop with one line."""
    from test_train import TINY
    vae_flags = [f for f in TINY if f.startswith('--vae.') or f == '--clips' or f == '6']
    codec = tmp_path / 'codec'
    mp = pytest.MonkeyPatch()
    tiny_recipes(mp)
    try:
        train_main(['--toy', '--stage', 'vae', '--out', str(codec), '--vae-steps', '4',
                    *vae_flags, '--vae.bottleneck=rvq', '--vae.rvq_levels=2',
                    '--vae.rvq_codebook=4', '--log-every', '1'])
        lm = tmp_path / 'rq'
        lm_flags = [f for f in TINY_RQ if f not in ('--levels', '3', '--codebook-size', '16')]
        train_main(['--stage', 'lm', '--vae-from', str(codec), '--out', str(lm), '--model', 'rq',
                    '--lm-steps', '2', '--lm-clips', '6', *lm_flags])
    finally:
        mp.undo()
    recs = [json.loads(line) for line in open(codec / 'log.jsonl')]
    assert all('commit' in r and np.isfinite(r['loss']) for r in recs if r.get('stage') == 'vae')
    vae, model = pipeline.load(str(lm))
    assert (model.cfg.n_q, model.cfg.codebook_size) == (2, 4) and bool(vae.rvq_ready)
    assert torch.equal(model.rvq.codebooks, vae.rvq.codebooks)
    assert float(vae.latent_std.min()) == 1.0 == float(vae.latent_std.max())   # not standardised
    clip = data.make_clip(data.clip_seed('heldout', 0), seconds=2.0)
    x = vae.encode(torch.tensor(clip.wav[None]))
    assert torch.equal(model.rvq.encode(x), vae.rvq.encode(x))   # the codec's codes
    wav = pipeline.continue_clip(vae, model, clip, 4, 3, 1, 0.8, torch.Generator().manual_seed(0),
                                 'cpu')
    assert wav.shape == (7 * vae.hop,) and np.isfinite(wav).all()
    import evaluate  # --table on a codec run alone: its own round trip, no fitted control
    try:
        res = evaluate.main(['--table', str(lm), '--clips', '2', '--clips-cont', '1',
                             '--timbre-fit', '5', '--continue-seconds', '1', '--skip-speed'])
    finally:
        torch.set_flush_denormal(False)  # evaluate.main sets it process-wide
    (name, row), = res['codec']['rows'].items()
    assert name == 'rq: end-to-end rvq Q=2 K=4' and row['bits'] == 4.0
    assert 0 <= row['note_acc'] <= 1 and np.isfinite(row['log_mel_l1'])
    assert '== Codec: end-to-end RVQ codecs (' in evaluate.report_table(res)
    for flags, msg in ((['--model', 'calm'], 'RVQ bottleneck'),
                       (['--model', 'delay', '--codebook-size', '8'], 'do not fit')):
        with pytest.raises(SystemExit, match=msg):
            train_main(['--stage', 'lm', '--vae-from', str(codec), '--out', str(tmp_path / 'bad'),
                        '--lm-steps', '1', '--clips', '6', *flags])
