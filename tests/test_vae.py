"""The causal audio VAE (vae.py): frame arithmetic, causality, KL, latent statistics, training."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import metrics
import vae

# Tiny but complete: 3 strided stages (hop 24), residual units, a 2-layer causal Transformer with a
# 3-frame attention window (shorter than the test inputs, so the sliding window is exercised too).
TINY = vae.Config(ratios=(4, 3, 2), channels=4, max_channels=16, latent_dim=4, d_model=16,
                  n_transformer_layers=2, n_heads=2, context=3, stft_sizes=(64, 32))


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault('spec_weight', 1.0 if kw.get('stft_hop') else 0.0)
    return vae.VAE(dataclasses.replace(TINY, **kw)).eval()


def learned(seed=0):
    """Spectral ends with the learned-phase head, its phase increments made non-zero (they start at
    0)."""
    m = tiny(seed, stft_hop=6, phase='learned')
    with torch.no_grad():
        m.phase_net[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return m


def test_presets_are_12_5_frames_per_second():
    for cfg in (vae.PAPER, vae.TOY):
        m = vae.VAE(cfg)
        assert m.hop == 1920 and m.frame_rate == 12.5 and cfg.sample_rate == 24000
    assert vae.PAPER.ratios == (6, 5, 4, 4, 4) and vae.PAPER.latent_dim == 32


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 2), st.sampled_from([0, 6]))
def test_frame_count_and_output_length(T, B, stft_hop):
    m = tiny(stft_hop=stft_hop)
    x = m.encode(torch.randn(B, T))
    S = -(-T // m.hop)
    assert x.shape == (B, S, TINY.latent_dim) and m.n_frames(T) == S
    assert m.decode(x).shape == (B, S * m.hop)
    loss, stats = m(torch.randn(B, T))  # the training loss works on any length too
    assert torch.isfinite(loss) and set(stats) >= {'loss', 'kl'} and len(stats) >= 3


@settings(max_examples=25, deadline=None)
@given(st.floats(0, 0.999), st.integers(0, 1000), st.sampled_from([0, 6]))
def test_encoder_is_causal(frac, seed, stft_hop):
    # Latent s sees samples < (s + 1) * hop only (left-padded convs, causal windowed attention):
    # perturbing samples >= p leaves every latent with (s + 1) * hop <= p unchanged, and changes the
    # others.
    m = tiny(stft_hop=stft_hop)
    p = int(frac * 10 * m.hop)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 10 * m.hop, generator=g)
    y = x.clone()
    y[:, p:] += torch.randn(1, y.shape[1] - p, generator=g)
    a, b = m.posterior(x)[0], m.posterior(y)[0]
    n_safe = p // m.hop
    assert torch.equal(a[:, :n_safe], b[:, :n_safe])
    assert not torch.allclose(a[:, n_safe], b[:, n_safe])  # the frame holding sample p does change


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 9), st.integers(0, 1000), st.sampled_from([0, 6, 'learned']))
def test_decoder_is_causal(s, seed, ends):
    # Output sample t depends on latents <= t // hop only (transposed convs trimmed right; with the
    # spectral ends, frame f is added from sample f * stft_hop on and depends on latents <= f *
    # stft_hop // hop; the learned phase of frame f sums increments of frames <= f).
    m = learned(seed) if ends == 'learned' else tiny(stft_hop=ends)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 10, TINY.latent_dim, generator=g)
    w = z.clone()
    w[:, s:] += torch.randn(1, 10 - s, TINY.latent_dim, generator=g)
    a, b = m.decode(z), m.decode(w)
    assert torch.equal(a[:, :s * m.hop], b[:, :s * m.hop])
    assert not torch.allclose(a[:, s * m.hop:(s + 1) * m.hop], b[:, s * m.hop:(s + 1) * m.hop])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=8, max_size=8),
       st.lists(st.floats(-5, 5), min_size=8, max_size=8))
def test_kl_is_the_closed_form_of_two_gaussians(mu, logvar):
    """KL(N(mu, e^logvar) || N(0, 1)) summed over the latent dims and averaged over frames, against
    torch.distributions' closed form; zero exactly when the posterior is the prior."""
    mu, logvar = torch.tensor(mu).view(2, 1, 4), torch.tensor(logvar).view(2, 1, 4)
    D = torch.distributions
    ref = D.kl_divergence(D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum(-1).mean()
    assert vae.kl_divergence(mu, logvar).item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5)
    assert vae.kl_divergence(torch.zeros(3, 5, 4), torch.zeros(3, 5, 4)) == 0  # posterior == prior


@pytest.mark.parametrize('stft_hop', [0, 6])
def test_training_samples_the_posterior_by_reparameterisation(stft_hop, monkeypatch):
    """The training loss decodes z = mu + e^(logvar / 2) eps, eps ~ N(0, I) (Kingma & Welling, arXiv
    1312.6114 §2.4): given a posterior, the decoded z have its mean and variance in every dim."""
    m = tiny(stft_hop=stft_hop).train()
    mu = torch.tensor([-1.0, 0.0, 0.5, 2.0]).expand(8, 1000, 4)
    logvar = torch.tensor([-2.0, 0.0, 1.0, -0.5]).expand(8, 1000, 4)
    monkeypatch.setattr(m, 'posterior', lambda wav: (mu, logvar))
    seen = {}
    decoder_input = m.dec_bottleneck.forward
    monkeypatch.setattr(m.dec_bottleneck, 'forward',
                        lambda z: (seen.setdefault('z', z.transpose(1, 2)), decoder_input(z))[1])
    with torch.no_grad():
        m(torch.randn(8, 1000 * m.hop))
    z = seen['z'].reshape(-1, 4)
    assert torch.allclose(z.mean(0), mu[0, 0], atol=0.05)
    assert torch.allclose(z.var(0), logvar[0, 0].exp(), rtol=0.06)


def test_loss_is_the_weighted_sum_of_its_terms():
    """Paper Eq. 2: reconstruction terms + kl_weight * KL, each term as its own function scores it,
    on both kinds of ends (waveform: L1 + multi-resolution STFT; spectral: the log-magnitude loss).
    """
    for cfg in (dataclasses.replace(TINY, kl_weight=0.5, time_weight=2.0, freq_weight=3.0),
                dataclasses.replace(TINY, stft_hop=6, spec_weight=2.0, kl_weight=0.5,
                                    time_weight=0.0, freq_weight=0.0)):
        torch.manual_seed(0)
        m = vae.VAE(cfg).train()
        wav = torch.randn(2, 240)
        torch.manual_seed(1)
        loss, stats = m(wav)
        mu, logvar = m.posterior(wav)
        assert stats['kl'] == pytest.approx(vae.kl_divergence(mu, logvar).item(), rel=1e-5)
        if cfg.stft_hop:
            expect = cfg.spec_weight * stats['spec'] + cfg.kl_weight * stats['kl']
        else:
            expect = (cfg.time_weight * stats['l1'] + cfg.freq_weight * stats['stft']
                      + cfg.kl_weight * stats['kl'])
        assert loss.item() == pytest.approx(expect, rel=1e-5)


def test_stft_loss_closed_form():
    """On loud noise (every magnitude >> the 1e-2 floor), stft_loss(x, c x) = |log c| (the log-
    magnitude L1) + |c - 1| (the spectral convergence ||X - cX|| / ||X||) at every size; 0 for
    y = x."""
    x = 100 * torch.randn(1, 8192, generator=torch.Generator().manual_seed(0))
    for c in (2.0, 0.5):
        assert vae.stft_loss(x, c * x, (512, 256)).item() == pytest.approx(
            abs(math.log(c)) + abs(c - 1), rel=0.02)
    assert vae.stft_loss(x, x, (512,)).item() == 0


@pytest.mark.parametrize('scale', ['dim', 'global'])
def test_latent_stats_standardise_and_round_trip(scale):
    m = vae.VAE(dataclasses.replace(TINY, latent_scale=scale))
    wav = torch.randn(2, 10 * m.hop)
    mu, _ = m.posterior(wav)
    m.set_latent_stats(mu.reshape(-1, TINY.latent_dim))
    x = m.encode(wav).reshape(-1, TINY.latent_dim)
    assert torch.allclose(x.mean(0), torch.zeros(TINY.latent_dim), atol=1e-5)
    if scale == 'dim':   # every dim at unit variance
        assert torch.allclose(x.std(0), torch.ones(TINY.latent_dim), atol=1e-4)
    else:   # unit variance on average, each dim keeping its share of it
        assert x.var(0).mean().item() == pytest.approx(1, abs=1e-4)
        raw_std = mu.reshape(-1, TINY.latent_dim).std(0)
        assert torch.allclose(x.std(0), raw_std / raw_std.pow(2).mean().sqrt(), atol=1e-4)
        assert raw_std.max() > 1.2 * raw_std.min()   # so the two scalings differ here
        assert torch.all(m.latent_std == m.latent_std[0])
    # decode() un-standardises: same audio as decoding the raw mean
    assert torch.allclose(m.decode(m.encode(wav)), m.decode_raw(mu), atol=1e-5)
    # the statistics travel with the state dict (the checkpoint format of train.py)
    m2 = vae.VAE(vae.Config(**dataclasses.asdict(m.cfg)))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.latent_std, m.latent_std)


def test_discriminator_losses():
    cfg = dataclasses.replace(TINY, discriminator=True, disc_channels=4)
    d = vae.make_discriminator(cfg)
    real, fake = torch.randn(2, 4096), torch.randn(2, 4096, requires_grad=True)
    assert vae.disc_loss(d, real, fake.detach()) >= 0
    adv, feat = vae.generator_adv_loss(d, real, fake)
    (adv + feat).backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all()
    _, feat_same = vae.generator_adv_loss(d, real, real)
    assert feat_same == 0


@pytest.mark.parametrize('ends', ['waveform', 'spectral'])
def test_short_training_lowers_held_out_reconstruction(ends):
    """A few dozen steps on random crops of training clips (as train.py draws them) lower the
    reconstruction error of held-out clips the VAE never saw, decoded from the posterior mean: the
    training loss teaches the codec, not one batch. Waveform ends: L1 + multi-resolution STFT;
    spectral ends (the toy's): log-magnitude L1 on the decoder's magnitudes."""
    torch.manual_seed(0)
    if ends == 'waveform':
        cfg = dataclasses.replace(TINY, ratios=(8, 4, 2), channels=8, max_channels=32,
                                  stft_sizes=(512, 128))
    else:
        cfg = dataclasses.replace(TINY, ratios=(2,), stft_hop=240, channels=32, max_channels=32,
                                  n_transformer_layers=0, spec_weight=1.0, time_weight=0.0,
                                  freq_weight=0.0, kl_weight=1e-4)
    m = vae.VAE(cfg)
    train_wavs = [c.wav for c in data.toy_clips('train', 8, seconds=2.0)]
    held = torch.from_numpy(np.stack([c.wav[:7680] for c in data.toy_clips('heldout', 4, 1.0)]))

    def error():   # deterministic: the posterior mean, decoded
        with torch.no_grad():
            mu, _ = m.posterior(held)
            if cfg.stft_hop:
                return float((m.spectral_out(mu)[0] - m.log_spectrogram(held)).abs().mean())
            y = m.decode_raw(mu)
            return float(vae.stft_loss(held, y, cfg.stft_sizes) + (y - held).abs().mean())

    before = error()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for step in range(40):
        loss, _ = m(torch.from_numpy(data.crop_batch(train_wavs, step, 0, 4, 3840)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = error()
    assert after < 0.6 * before, (before, after)


def test_config_errors_instead_of_ignored_fields():
    for bad in (dict(phase='learned'), dict(spec_weight=1.0), dict(phase='griffin-lim', stft_hop=6),
                dict(stft_hop=6, phase='learned', time_weight=0.0, freq_weight=0.0),
                dict(disc_start=1.0), dict(stft_hop=6, phase='learned', spec_weight=0.0),
                dict(latent_scale='per-dim')):
        with pytest.raises(ValueError):
            vae.VAE(dataclasses.replace(TINY, **bad))
    vae.VAE(dataclasses.replace(TINY, stft_hop=6, spec_weight=1.0, phase='learned', time_weight=0.0,
                                freq_weight=0.0, discriminator=True))
    # the toy default trains on its log-magnitudes only; a learned-phase toy needs a waveform loss
    assert (vae.TOY.phase, vae.TOY.time_weight, vae.TOY.freq_weight,
            vae.TOY.spec_weight) == ('vocoder', 0, 0, 1)


def test_learned_head_starts_as_the_phase_vocoder():
    m = tiny(stft_hop=6, phase='learned')
    logmag = torch.randn(2, m.n_fft // 2 + 1, 12)
    a = m.vocoder(logmag, 12 * m.cfg.stft_hop)
    d = m.phase_net(torch.randn(2, m.phase_net[0].in_channels, 12))
    assert torch.equal(d, torch.zeros_like(d))
    assert torch.allclose(a, m.istft_head(logmag, d, 12 * 6), atol=1e-5)


def test_learned_head_can_carry_the_true_phase():
    # Given the true magnitudes and the true phase increments of a toy clip's causal STFT, the
    # learned head rebuilds the waveform, delayed by vae.delay samples; the phase vocoder
    # (increments 0) cannot.
    m = vae.VAE(dataclasses.replace(vae.TOY, phase='learned', freq_weight=1.0))
    wav = torch.from_numpy(data.make_clip(3, seconds=1.0).wav)[None]
    hop, n = m.cfg.stft_hop, wav.shape[1]
    frames = torch.nn.functional.pad(wav, (m.n_fft - hop, 0)).unfold(-1, m.n_fft, hop)
    X = torch.fft.rfft(frames * m.window)
    phi = X.angle().transpose(1, 2)  # [1, bins, frames]
    k = torch.arange(phi.shape[1])[:, None]
    inc = torch.diff(phi, dim=-1, prepend=torch.zeros_like(phi[..., :1])) - torch.cat(
        [torch.zeros(phi.shape[1], 1), (math.pi / 2) * k.expand(-1, phi.shape[-1] - 1)], 1)
    # principal value: the deviation from the bin centre
    inc = torch.remainder(inc + math.pi, 2 * math.pi) - math.pi
    d = torch.atanh((inc / math.pi).clamp(-1 + 1e-6, 1 - 1e-6)).requires_grad_()
    logmag = m.log_spectrogram(wav)
    out = m.istft_head(logmag, d, n)
    ref = wav[0, :n - m.delay].numpy()
    assert metrics.si_sdr(ref, out[0, m.delay:].detach().numpy()) > 30
    assert metrics.si_sdr(ref, m.vocoder(logmag, n)[0, m.delay:].numpy()) < 0
    out.square().sum().backward()
    assert d.grad.abs().sum() > 0  # the waveform losses reach the phase increments


@pytest.mark.parametrize('ends', [0, 6, 'learned'])
def test_adversary_trains_the_discriminator_and_sends_gradient_to_the_vae(ends):
    # waveform decoder, spectral ends with the vocoder (D's gradient reaches the magnitudes), and
    # the learned head (it reaches the phase branch only: the magnitudes belong to the spectral
    # loss)
    if ends == 'learned':
        kw = dict(stft_hop=6, spec_weight=1.0, phase='learned')
    else:
        kw = dict(stft_hop=ends, spec_weight=float(ends > 0))
    cfg = dataclasses.replace(TINY, discriminator=True, disc_channels=4, disc_start=0.5, **kw)
    torch.manual_seed(0)
    m = vae.VAE(cfg)
    if ends == 'learned':  # make the increments depend on the features (they start at 0)
        torch.nn.init.normal_(m.phase_net[-1].weight, 0, 0.1)
    rng = torch.get_rng_state()
    adv = vae.Adversary(cfg, seed=0, device='cpu', ddp=False)
    assert torch.equal(rng, torch.get_rng_state())  # adding a discriminator does not move the VAE's
                                                    # noise draws
    wav = torch.randn(2, 4096)
    loss, stats = m(wav)
    # before disc_start: nothing
    assert adv(4, 10, 1e-3, *m.last, stats) == 0.0 and 'd_loss' not in stats
    d0 = [p.detach().clone() for p in adv.disc.parameters()]
    trained = m.phase_net if ends == 'learned' else m.decoder
    for weights in ((1.0, 0.0), (0.0, 1.0)):  # the adversarial term, then the feature-matching term
                                              # alone
        adv.cfg = dataclasses.replace(cfg, adv_weight=weights[0], feat_weight=weights[1])
        m.zero_grad()
        loss, stats = m(wav)
        g_terms = adv(5, 10, 1e-3, *m.last, stats)
        d_grads = [p.grad.clone() for p in adv.disc.parameters()]  # of D's own update
        g_terms.backward()
        grads = [p.grad for p in trained.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        if ends == 'learned':
            assert all(p.grad is None for p in m.decoder.parameters())
        # G's terms leave D alone
        assert all(torch.equal(a, p.grad) for a, p in zip(d_grads, adv.disc.parameters()))
        assert {'d_loss', 'g_adv', 'g_feat'} <= set(stats)
    # D took its own steps
    assert any(not torch.equal(a, b) for a, b in zip(d0, adv.disc.parameters()))


# --- the RVQ bottleneck: a discrete codec trained end to end ----------------------------------

def rvq_vae(seed=0, **kw):
    """3 levels of 8 codewords; EMA decay 0.8 so that dead codewords restart within a short test
    (the default 0.99 takes hundreds of steps)."""
    return tiny(seed, **{**dict(bottleneck='rvq', rvq_levels=3, rvq_codebook=8, rvq_decay=0.8,
                                n_transformer_layers=0), **kw})


def test_rvq_codec_learns_with_codes_in_range_and_straight_through_gradients():
    """Toy audio through the tiny codec with an RVQ bottleneck (k-means on the first batch, EMA
    codebooks, commitment loss): the loss falls over 40 steps, every code is one of the K
    codewords of its level, and the decoder's gradient reaches the encoder through the
    quantiser (straight-through) even with the commitment loss switched off."""
    clips = [c.wav for c in data.toy_clips('train', 4, seconds=1.0)]
    wav = torch.tensor(np.stack(clips))[:, 12000:12000 + 24 * 60]   # 60 frames of notes each
    m = rvq_vae().train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, stats = m(wav)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(stats['loss'])
        assert set(stats) >= {'commit', 'stft'} and 'kl' not in stats
    assert bool(m.rvq_ready) and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    m.eval()
    x = m.encode(wav)
    codes = m.rvq.encode(x)
    assert codes.shape == (*x.shape[:2], 3) and codes.min() >= 0 and codes.max() < 8
    assert len(codes[..., 0].unique()) > 1                       # not a collapsed codebook
    assert torch.equal(m.quantise(x), m.rvq.decode(codes))      # what the decoder reads
    # straight-through: only the reconstruction terms, and still a gradient at the first conv
    st_only = rvq_vae(commit_weight=0.0).train()
    st_only(wav)[0].backward()
    assert st_only.encoder[0].weight.grad.abs().sum() > 0
    mu, _ = st_only.posterior(wav)
    xq, _, commit = st_only.rvq_bottleneck(mu)
    assert xq.shape == mu.shape and commit > 0


def test_gaussian_vae_has_no_rvq_state_and_bad_bottleneck_is_an_error():
    m = tiny()
    assert m.rvq is None and not any('rvq' in k for k in m.state_dict())
    x = torch.randn(1, 5, TINY.latent_dim)
    assert m.quantise(x) is x
    with pytest.raises(ValueError, match='bottleneck'):
        vae.VAE(dataclasses.replace(TINY, bottleneck='vq'))
    with pytest.raises(ValueError, match='lower rvq_codebook'):
        rvq_vae(rvq_codebook=64).train()(torch.randn(1, 24 * 4))
