"""
The audio VAE of CALM (paper Eq. 2, the VAE-GAN loss, and Table 13): a Mimi-like causal codec
(SEANet convolutional encoder/decoder with a Transformer in the bottleneck) whose residual vector
quantiser is replaced by a Gaussian bottleneck. The encoder outputs a mean and a log-variance per 80
ms frame, training samples with the reparameterisation trick and pays a KL to N(0, I); the language
model reads the (standardised) posterior mean.

    vae = VAE(TOY)
    x = vae.encode(wav)       # [B, T] -> [B, ceil(T / hop), D], standardised posterior mean
    wav_hat = vae.decode(x)   # [B, S, D] -> [B, S * hop]
    loss, stats = vae(wav)    # training: L1 + multi-res STFT + kl_weight * KL (+ Adversary's
                              # terms); TOY: a loss on the decoded log-magnitudes + kl_weight * KL

Everything is causal: latent s depends only on samples < (s + 1) * hop, and output sample t only on
latents <= t // hop, so the codec can stream (the paper's VAE is causal, like Mimi; CALM generates
frame by frame). Read it after data.py and before calm.py: the LM never sees audio, only
vae.encode's latents; the VAE-GAN's discriminator (Adversary) and the learned-phase head are
options the toy does not use.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import rq
import transformer


@dataclass
class Config:
    sample_rate: int = 24000
    ratios: tuple = (6, 5, 4, 4, 4)  # SEANet convention: decoder order; the encoder applies them
                                     # reversed
    channels: int = 64               # width after the first conv; doubles at every downsampling
    max_channels: int = 1024         # cap on the doubling
    n_residual: int = 1              # residual units per resolution (SEANet/Mimi use 1, dilation 1)
    latent_dim: int = 32
    d_model: int = 512               # bottleneck Transformer width
    n_transformer_layers: int = 8    # per side (encoder and decoder), paper Table 13
    n_heads: int = 8
    context: int = 125               # attention window in frames (paper: 10 s at 12.5 Hz)
    kl_weight: float = 0.01          # paper Table 13
    time_weight: float = 1.0         # waveform L1
    freq_weight: float = 1.0         # multi-resolution STFT
    stft_sizes: tuple = (2048, 1024, 512, 256, 128)
    stft_hop: int = 0                # 0: SEANet convs on the waveform. >0: spectral ends (TOY), see
                                     # VAE
    spec_weight: float = 0.0         # spectral ends only: the loss on the decoder's log-magnitudes
    phase: str = 'vocoder'           # spectral ends only: 'vocoder' (fixed phase advance) or
                                     # 'learned' (iSTFT head)
    discriminator: bool = False      # VAE-GAN: multi-scale STFT discriminator, trained by train.py
    disc_channels: int = 32
    disc_start: float = 0.3          # VAE-GAN: fraction of the training steps that are
                                     # reconstruction-only
    adv_weight: float = 0.1
    feat_weight: float = 1.0
    # 'gaussian' (CALM's VAE) or 'rvq': the same encoder and decoder around a residual vector
    # quantiser trained end to end, the discrete codec the paper's baselines read (Mimi, arXiv
    # 2410.00037 §3.3; SoundStream arXiv 2107.03312 §3.3): straight-through estimator, commitment
    # loss (rq.RVQ.forward), EMA codebooks initialised by k-means on the first batch
    bottleneck: str = 'gaussian'
    rvq_levels: int = 8          # Q codebooks ...
    rvq_codebook: int = 64       # ... of K codewords: Q log2 K bits per frame
    commit_weight: float = 1.0   # commitment loss weight (EnCodec arXiv 2210.13438 §3.2: 1)
    rvq_decay: float = 0.99      # EMA decay of the codebooks (EnCodec, Mimi)
    rvq_dead: float = 0.1        # restart a codeword used under this x the mean usage (Mimi)
    # the LM reads (mu - mean) / std, std per 'dim' or one 'global' scale (the paper allows both;
    # global, which keeps low-variance dims small, did no better on the toy: docs/toy.md)
    latent_scale: str = 'dim'


# Paper's speech VAE (Table 13): 24 kHz, ratios 6,5,4,4,4 -> hop 1920 -> 12.5 frames/s, 32 dims,
# 8 Transformer layers each side, 10 s context, KL weight 0.01, VAE-GAN. (For a GPU.)
PAPER = Config(discriminator=True)

# Small (one GPU, your own speech or music: train.py --preset small): the paper's speech VAE layout
# (24 kHz, 12.5 frames/s, 32 dims, same ratios) with half the conv channels, a 256-wide bottleneck
# and 2 Transformer layers per side (as pocket-tts's codec; fewer layers also shorten the left
# context of chunked encoding).
SMALL = Config(channels=32, max_channels=512, d_model=256, n_transformer_layers=2, n_heads=4,
               discriminator=True)

# Toy (CPU): the same 12.5 frames/s and design, with the outermost stage of each side a fixed
# transform: the encoder reads a causal STFT (n_fft 960, hop 240: log-magnitudes at 100 frames/s)
# and one strided conv stage (x8); the decoder mirrors it and a phase vocoder makes the waveform
# (phase='learned': a learned-phase iSTFT head, docs/codec.md). Why, and why no Transformer in its
# bottleneck: on 2 CPU cores only this one learnt the pitches (docs/findings.md, "Why this VAE for
# the toy?"). The price: phases are not modelled, so SI-SDR is meaningless.
TOY = Config(ratios=(8,), stft_hop=240, channels=256, max_channels=256, n_residual=2, latent_dim=16,
             d_model=128, n_transformer_layers=0, n_heads=4, context=16, kl_weight=1e-4,
             spec_weight=1.0, time_weight=0.0, freq_weight=0.0)


# -----------------------------------------------------------------------------------------------
# Causal building blocks

class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only: output t sees inputs <= t * stride + (stride - 1).

    With kernel = 2 * stride (SEANet's downsampling) the left pad is kernel - stride, so an input of
    length L (a multiple of stride) gives exactly L / stride outputs.
    """

    def forward(self, x):
        pad = (self.kernel_size[0] - 1) * self.dilation[0] + 1 - self.stride[0]
        return super().forward(F.pad(x, (pad, 0)))


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Transposed conv trimmed on the right: length L -> L * stride; output t sees inputs
    <= t // stride."""

    def forward(self, x):
        y = super().forward(x)
        trim = self.kernel_size[0] - self.stride[0]
        return y[..., :y.shape[-1] - trim] if trim > 0 else y


class ResidualUnit(nn.Module):
    """SEANet residual unit: ELU, causal conv k=3 (dilated), ELU, conv k=1, plus skip."""

    def __init__(self, ch, dilation=1):
        super().__init__()
        self.conv1 = CausalConv1d(ch, ch // 2, 3, dilation=dilation)
        self.conv2 = CausalConv1d(ch // 2, ch, 1)

    def forward(self, x):
        return x + self.conv2(F.elu(self.conv1(F.elu(x))))


class Bottleneck(nn.Module):
    """Linear in, a few causal Transformer blocks over frames (transformer.Block), LayerNorm, linear
    out ([B, C, S] layout). The blocks attend to cfg.context past frames, as Mimi's bottleneck
    Transformer does, so a model trained on short crops behaves the same on long files."""

    def __init__(self, cfg, c_in, c_out):
        super().__init__()
        self.inp = nn.Linear(c_in, cfg.d_model)
        self.blocks = nn.ModuleList(transformer.Block(cfg.d_model, cfg.n_heads, cfg.context)
                                    for _ in range(cfg.n_transformer_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, c_out)

    def forward(self, x):
        h = self.inp(x.transpose(1, 2))
        for b in self.blocks:
            h = b(h)
        return self.out(self.ln(h)).transpose(1, 2)


# -----------------------------------------------------------------------------------------------
# The VAE

class VAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.hop = math.prod(cfg.ratios) * max(cfg.stft_hop, 1)
        self.frame_rate = cfg.sample_rate / self.hop
        chans = [min(cfg.channels * 2 ** i, cfg.max_channels) for i in range(len(cfg.ratios) + 1)]
        # Input and output of the conv stacks: the waveform (1 channel), or with stft_hop > 0 the
        # n_fft / 2 + 1 log-magnitudes of a causal STFT frame (n_fft = 4 * stft_hop, Hann, 75%
        # overlap).
        self.n_fft = 4 * cfg.stft_hop
        io = self.n_fft // 2 + 1 if cfg.stft_hop else 1
        self.delay = self.n_fft - cfg.stft_hop  # the output is the input delayed by this many
                                                # samples (see vocoder)
        # dilations 1, 3, 9 (SEANet)
        res = lambda ch: [ResidualUnit(ch, 3 ** j) for j in range(cfg.n_residual)]
        # Encoder (SEANet): conv k7, then per ratio (smallest first): residual units, ELU, strided
        # conv (kernel 2r) doubling the channels; then the bottleneck Transformer and a head for
        # mean/logvar.
        enc = [CausalConv1d(io, chans[0], 7)]
        for i, r in enumerate(reversed(cfg.ratios)):
            enc += res(chans[i]) + [nn.ELU(), CausalConv1d(chans[i], chans[i + 1], 2 * r, stride=r)]
        self.encoder = nn.Sequential(*enc, nn.ELU())
        # a mean and a log-variance per frame; with an RVQ bottleneck the vector to quantise
        rvq_ = cfg.bottleneck == 'rvq'
        self.enc_bottleneck = Bottleneck(cfg, chans[-1], (1 if rvq_ else 2) * cfg.latent_dim)
        # Decoder mirrors it: bottleneck Transformer, then per ratio (largest first): ELU,
        # transposed conv halving the channels (trimmed right: causal), residual units; ELU and conv
        # k7 to the output.
        self.dec_bottleneck = Bottleneck(cfg, cfg.latent_dim, chans[-1])
        dec = []
        for i, r in zip(range(len(cfg.ratios), 0, -1), cfg.ratios):
            up = CausalConvTranspose1d(chans[i], chans[i - 1], 2 * r, stride=r)
            dec += [nn.ELU(), up] + res(chans[i - 1])
        self.decoder = nn.Sequential(*dec, nn.ELU(), CausalConv1d(chans[0], io, 7))
        if cfg.phase == 'learned':  # the learned head's phase branch: per-bin phase increments
            self.phase_net = nn.Sequential(CausalConv1d(chans[0], chans[0], 7), nn.ELU(),
                                           CausalConv1d(chans[0], io, 7))
        if cfg.stft_hop:
            self.register_buffer('window', torch.hann_window(self.n_fft), persistent=False)
        self.apply(init_weights)
        if cfg.phase == 'learned':  # phase increments start at 0: the learned head starts as the
                                    # phase vocoder
            nn.init.zeros_(self.phase_net[-1].weight)
        # Start with a narrow posterior (std e^-2): with logvar = 0 the sampled latent is pure noise
        # at init, the decoder learns to ignore it and the KL then collapses the posterior to the
        # prior.
        nn.init.constant_(self.enc_bottleneck.out.bias[cfg.latent_dim:], -4.0)
        # Latent statistics for the LM (TrigFlow's known sigma_d): encode() returns (mu - mean) /
        # std, decode() inverts.
        self.register_buffer('latent_mean', torch.zeros(cfg.latent_dim))
        self.register_buffer('latent_std', torch.ones(cfg.latent_dim))
        self.rvq = None
        if rvq_:   # codebooks are buffers (EMA, not gradient); set on the first training batch
            self.rvq = rq.RVQ(cfg.latent_dim, cfg.rvq_levels, cfg.rvq_codebook, cfg.rvq_decay,
                              cfg.rvq_dead)
            self.register_buffer('rvq_ready', torch.zeros((), dtype=torch.bool))

    def n_frames(self, n_samples):
        return -(-int(n_samples) // self.hop)

    def log_spectrogram(self, wav):
        """wav [B, T] (T a multiple of stft_hop) -> causal log-magnitudes [B, n_fft/2+1,
        T/stft_hop]: frame f covers samples [(f+1) hop - n_fft, (f+1) hop), so it never sees the
        future."""
        hop = self.cfg.stft_hop
        frames = F.pad(wav, (self.n_fft - hop, 0)).unfold(-1, self.n_fft, hop)
        return torch.log(torch.fft.rfft(frames * self.window).abs() + 1e-3).transpose(1, 2)

    def posterior(self, wav):
        """wav [B, T] -> raw (mu, logvar), each [B, S, D], S = ceil(T / hop) (right zero-padding).
        With an RVQ bottleneck: (the encoder's vector before quantisation, None)."""
        T = wav.shape[-1]
        x = F.pad(wav, (0, self.n_frames(T) * self.hop - T))
        x = self.log_spectrogram(x) if self.cfg.stft_hop else x[:, None]
        h = self.enc_bottleneck(self.encoder(x))  # [B, 2D, S]
        if self.rvq is not None:
            return h.transpose(1, 2), None
        mu, logvar = h.transpose(1, 2).chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, z):
        """Raw latents [B, S, D] -> wav [B, S * hop]."""
        if not self.cfg.stft_hop:
            return self.decoder(self.dec_bottleneck(z.transpose(1, 2)))[:, 0]
        logmag, d = self.spectral_out(z)
        n = z.shape[1] * self.hop
        return self.vocoder(logmag, n) if d is None else self.istft_head(logmag, d, n)

    def spectral_out(self, z):
        """Spectral ends: raw latents [B, S, D] -> (log-magnitudes, phase increments or None), each
        [B, n_fft/2+1, 8 S]. The phase branch reads the decoder's features detached: the latent and
        the magnitudes are trained by the spectral loss alone (a toy latent read from log-magnitudes
        carries no more about the phase than the magnitudes do), and a learned phase costs no pitch
        accuracy."""
        feats = self.decoder[:-1](self.dec_bottleneck(z.transpose(1, 2)))
        phase = self.phase_net(feats.detach()) if self.cfg.phase == 'learned' else None
        return self.decoder[-1](feats), phase

    def vocoder(self, logmag, n):
        """Log-magnitudes [B, n_fft/2+1, F] -> wav [B, n]. Phase vocoder with bin-centre phase
        advance: bin k turns by 2 pi k hop / n_fft per frame, so every bin is a continuous sinusoid
        at its centre frequency and a partial between two bins comes out at the right pitch from the
        pair (measured on true magnitudes: 100% note-pitch accuracy). Frame f is overlap-added at
        samples [f hop, f hop + n_fft): output sample t depends on latents <= t // hop only
        (causal), at the price of a fixed n_fft - hop (30 ms) delay against the input."""
        hop, n_fft, N = self.cfg.stft_hop, self.n_fft, logmag.shape[-1]
        k = torch.arange(n_fft // 2 + 1, device=logmag.device)
        phase = (2 * math.pi * hop / n_fft) * torch.arange(N, device=logmag.device)[:, None] * k
        spec = torch.polar(torch.exp(logmag.float().clamp(max=8.0)).transpose(1, 2),
                           phase.expand(logmag.shape[0], -1, -1))
        return self.overlap_add(spec, n)

    def istft_head(self, logmag, d, n):
        """The learned-phase head (Vocos, arXiv 2306.00814 §3.2: log-magnitude and phase per bin,
        inverse STFT), with the phase predicted as a per-frame increment and summed over frames (the
        phase gradient of arXiv 2208.12782): a steady note gives a steady decoder output, hence a
        steady increment, hence a sinusoid; a phase predicted directly would repeat every frame. The
        increment is the vocoder's bin-centre advance plus pi * tanh(d) (a partial up to 50 Hz = 2
        bins away can steer the bin), and d starts at 0, so the head starts as the phase vocoder.
        Causal as the vocoder: the sum runs over past frames only, and the frames are overlap-added
        at the same places."""
        logmag, d = logmag.float(), d.float()  # [B, n_fft/2+1, F] each
        N, k = d.shape[-1], torch.arange(d.shape[1], device=d.device)
        # bin k turns by 2 pi k hop / n_fft = (pi / 2) k per frame (n_fft = 4 hop); reduced mod 2 pi
        # exactly
        base = (math.pi / 2) * ((torch.arange(N, device=d.device)[:, None] * k) % 4)
        phase = base + torch.cumsum(math.pi * torch.tanh(d), dim=-1).transpose(1, 2)
        mag = torch.exp(logmag.clamp(max=8.0)).transpose(1, 2)
        return self.overlap_add(torch.polar(mag, phase), n)

    def overlap_add(self, spec, n):
        """Complex frames [B, F, n_fft/2+1] -> wav [B, n]: frame f windowed and added at [f hop, f
        hop + n_fft)."""
        hop, n_fft, N = self.cfg.stft_hop, self.n_fft, spec.shape[1]
        frames = torch.fft.irfft(spec, n=n_fft) * self.window  # [B, F, n_fft]
        out = F.fold(frames.transpose(1, 2), (1, (N - 1) * hop + n_fft), (1, n_fft),
                     stride=(1, hop))
        return out[:, 0, 0, :n] / 1.5  # the squared Hann windows at 75% overlap sum to 1.5

    def grad_groups(self):
        """Parameters whose gradient norms train.py clips separately: the learned head's phase
        branch learns from other losses at another scale, and under one shared clip its spikes
        shrank the other parameters' steps (docs/codec.md)."""
        phase = [p for n, p in self.named_parameters() if n.startswith('phase_net.')]
        rest = [p for n, p in self.named_parameters() if not n.startswith('phase_net.')]
        return {'grad_norm': rest, 'grad_norm_phase': phase} if phase else {'grad_norm': rest}

    @torch.no_grad()
    def encode(self, wav):
        """wav [B, T] -> latents [B, S, D]: the standardised posterior mean; with an RVQ bottleneck
        the encoder's vector BEFORE quantisation (unstandardised), so that an LM's copy of the
        codebooks (rq.DiscreteLM.take_codebooks) reads exactly the codec's codes from it, and
        decode(quantise(encode(wav))) is the codec's round trip."""
        mu, _ = self.posterior(wav)
        return (mu - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def quantise(self, latents):
        """What the decoder of this codec reads for encoded latents: the sum of their RVQ
        codewords; for the Gaussian VAE the latents themselves."""
        return latents if self.rvq is None else self.rvq.decode(self.rvq.encode(latents))

    def rvq_bottleneck(self, x):
        """Training (and validation) quantisation of encoder vectors x [B, S, D]: (x_q with the
        straight-through gradient, codes, commitment loss) from rq.RVQ.forward, whose training
        mode also takes an EMA step of the codebooks. The first training batch initialises them by
        k-means, level by level on its residuals (EnCodec); dead-code restarts draw from a numpy
        generator seeded by the torch RNG, which checkpoints carry (resume stays exact)."""
        Q, K = self.cfg.rvq_levels, self.cfg.rvq_codebook
        if self.training and not self.rvq_ready:
            r = x.detach().reshape(-1, x.shape[-1]).float()
            if len(r) < K:
                raise ValueError(f'the RVQ bottleneck initialises {K} codewords by k-means on the '
                                 f'first batch, which has {len(r)} frames: lower rvq_codebook')
            rng = np.random.default_rng(0)
            for q in range(Q):
                self.rvq.init_level(q, r, rng, iters=10)
                r = r - self.rvq.codebooks[q][rq.nearest(r, self.rvq.codebooks[q])]
            self.rvq_ready.fill_(True)
        rngs = None
        if self.training:
            seed = int(torch.randint(2 ** 62, ()))
            rngs = [np.random.default_rng([seed, q]) for q in range(Q)]
        with torch.autocast(x.device.type, enabled=False):
            return self.rvq(x.float(), rngs)

    @torch.no_grad()
    def decode(self, latents):
        return self.decode_raw(latents * self.latent_std + self.latent_mean)

    @torch.no_grad()
    def set_latent_stats(self, latents_raw):
        """Per-dimension mean, and std per cfg.latent_scale, of raw posterior means [N, D] (std
        floored: near-constant dims). 'global' is the root mean variance, so sigma_d = 1 overall."""
        x = latents_raw.reshape(-1, self.cfg.latent_dim).float()
        self.latent_mean.copy_(x.mean(0))
        std = x.std(0) if self.cfg.latent_scale == 'dim' else x.var(0).mean().sqrt().expand(
            x.shape[1])
        self.latent_std.copy_(std.clamp_min(1e-3))

    def forward(self, wav):
        """Training loss on wav [B, T]: returns (loss, stats). Paper Eq. 2: reconstruction +
        kl_weight * KL; the adversarial terms of a VAE-GAN are added by the caller (train.py) on
        self.last = (target, output)."""
        cfg = self.cfg
        mu, logvar = self.posterior(wav)
        if self.rvq is None:
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation trick
            l_kl = kl_divergence(mu, logvar)
            reg, reg_stats = cfg.kl_weight * l_kl, {'kl': l_kl.item()}
        else:   # the codec's bottleneck: the decoder reads the codes' codewords
            z, codes, l_commit = self.rvq_bottleneck(mu)
            reg, reg_stats = cfg.commit_weight * l_commit, {'commit': l_commit.item()}
        T, stats = wav.shape[-1], {}
        if cfg.stft_hop:  # spectral ends: a loss on the decoder's log-magnitudes, the waveform
                          # losses below if asked
            target = self.log_spectrogram(F.pad(wav, (0, self.n_frames(T) * self.hop - T)))
            logmag, d = self.spectral_out(z)
            l_spec = spectral_loss(logmag, target)
            loss = cfg.spec_weight * l_spec + reg
            stats = {'loss': loss.item(), 'spec': l_spec.item(), **reg_stats}
            if not (cfg.time_weight or cfg.freq_weight or cfg.discriminator):
                return loss, stats
            # The waveform terms train the vocoder's magnitudes, or the learned head's phase branch
            # only.
            n = z.shape[1] * self.hop
            if d is None:
                wav_hat = self.vocoder(logmag, n)[:, :T]
            else:
                wav_hat = self.istft_head(logmag.detach(), d, n)[:, :T]
            # the spectral ends' output lags by self.delay samples
            wav = F.pad(wav, (self.delay, 0))[:, :T]
        else:
            wav_hat = self.decode_raw(z)[:, :T]
            loss = reg
        l_time = (wav_hat - wav).abs().mean()
        l_freq = stft_loss(wav, wav_hat, cfg.stft_sizes)
        loss = loss + cfg.time_weight * l_time + cfg.freq_weight * l_freq
        self.last = (wav, wav_hat)  # for the adversarial terms, when a discriminator is trained
        return loss, {**stats, 'loss': loss.item(), 'l1': l_time.item(), 'stft': l_freq.item(),
                      **reg_stats}

    loss = forward


def check_config(cfg):
    """A clear error for a combination that would leave a field without effect."""
    if cfg.phase not in ('vocoder', 'learned'):
        raise ValueError(f"vae.Config.phase must be 'vocoder' or 'learned', not {cfg.phase!r}")
    if not cfg.stft_hop and (cfg.phase != 'vocoder' or cfg.spec_weight):
        raise ValueError('vae.Config.phase and spec_weight act on the spectral ends: set '
                         'stft_hop > 0 (the waveform decoder learns its phase anyway)')
    waveform_loss = cfg.time_weight or cfg.freq_weight or cfg.discriminator
    if cfg.phase == 'learned' and not (cfg.spec_weight and waveform_loss):
        raise ValueError("phase='learned' needs spec_weight (its magnitudes) and a loss on the "
                         'waveform (its phase): time_weight, freq_weight or discriminator')
    if cfg.bottleneck not in ('gaussian', 'rvq'):
        raise ValueError(f"vae.Config.bottleneck must be 'gaussian' or 'rvq', not "
                         f'{cfg.bottleneck!r}')
    if cfg.bottleneck == 'rvq' and (cfg.rvq_levels < 1 or cfg.rvq_codebook < 2):
        raise ValueError(f'an RVQ bottleneck needs rvq_levels >= 1 and rvq_codebook >= 2, got '
                         f'{cfg.rvq_levels} and {cfg.rvq_codebook}')
    if cfg.latent_scale not in ('global', 'dim'):
        raise ValueError(f"vae.Config.latent_scale is 'global' or 'dim', not {cfg.latent_scale!r}")
    if not 0 <= cfg.disc_start < 1:
        raise ValueError('vae.Config.disc_start is a fraction of the training steps in [0, 1), '
                         f'not {cfg.disc_start}')


def init_weights(mod):
    """Variance-preserving conv init (std = gain / sqrt(fan_in), zero bias). PyTorch's default init
    shrinks the signal ~2x per conv: after 10 convs the input-dependent part of the encoder output
    is ~1% of its biases, the latent carries nothing and training stalls (measured: no learning in
    200 steps)."""
    if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)):
        k = mod.kernel_size[0]
        if isinstance(mod, nn.ConvTranspose1d):  # each output sums in_ch * k / stride products
            fan_in = mod.in_channels * k / mod.stride[0]
        else:
            fan_in = mod.in_channels * k / mod.groups
        nn.init.normal_(mod.weight, 0.0, INIT_GAIN / math.sqrt(fan_in))
        nn.init.zeros_(mod.bias)


INIT_GAIN = 1.0


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dims, averaged over frames
    (nats/frame)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


def spectral_loss(pred, target):
    """Spectral ends: L1 of log-magnitudes (envelope, silence) + 10 x MSE of magnitudes^0.3. The
    toy's pitch lives in a few sharp harmonic peaks that a log-L1 alone learns slowly (it fits the
    many empty bins first); the compressed-magnitude MSE weighs the peaks (measured: ~2x faster to
    90% pitch)."""
    compressed = (torch.exp(0.3 * pred.clamp(max=8.0)) - torch.exp(0.3 * target)).pow(2).mean()
    return 0.1 * (pred - target).abs().mean() + 10 * compressed


def stft_loss(x, y, sizes):
    """Multi-resolution STFT loss: L1 of log magnitudes + spectral convergence, averaged over sizes.
    Large windows resolve the toy's semitones (a semitone at 196 Hz is 11.6 Hz = one 2048-bin);
    small ones keep attacks sharp."""
    total = 0.0
    for n in sizes:
        win = torch.hann_window(n, device=x.device, dtype=x.dtype)
        X = torch.stft(x, n, n // 4, window=win, return_complex=True, pad_mode='constant').abs()
        Y = torch.stft(y, n, n // 4, window=win, return_complex=True, pad_mode='constant').abs()
        total = total + (torch.log(X + 1e-2) - torch.log(Y + 1e-2)).abs().mean() \
            + torch.linalg.norm(X - Y) / (torch.linalg.norm(X) + 1e-7)
    return total / len(sizes)


# -----------------------------------------------------------------------------------------------
# Optional VAE-GAN discriminator (the paper follows Mimi / EnCodec: multi-scale STFT discriminator
# with hinge adversarial loss and L1 feature matching), trained by train.py through Adversary.

class STFTDiscriminator(nn.Module):
    def __init__(self, n_fft, ch):
        super().__init__()
        self.n_fft = n_fft
        self.convs = nn.ModuleList([
            nn.Conv2d(2, ch, (3, 9), padding=(1, 4)),
            nn.Conv2d(ch, ch, (3, 9), stride=(1, 2), padding=(1, 4)),
            nn.Conv2d(ch, ch, (3, 9), stride=(1, 2), padding=(1, 4)),
            nn.Conv2d(ch, ch, (3, 3), padding=(1, 1)),
        ])
        self.out = nn.Conv2d(ch, 1, (3, 3), padding=(1, 1))

    def forward(self, wav):
        win = torch.hann_window(self.n_fft, device=wav.device, dtype=wav.dtype)
        # [B, F, T]
        S = torch.stft(wav, self.n_fft, self.n_fft // 4, window=win, return_complex=True,
                       pad_mode='constant')
        h = torch.stack([S.real, S.imag], 1).transpose(2, 3)  # [B, 2, T, F]: convolve along
                                                              # frequency
        feats = []
        for c in self.convs:
            h = F.leaky_relu(c(h), 0.2)
            feats.append(h)
        return self.out(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    def __init__(self, cfg, sizes=(2048, 1024, 512)):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(n, cfg.disc_channels) for n in sizes)

    def forward(self, wav):
        return [d(wav) for d in self.discs]


def make_discriminator(cfg):
    return MultiScaleSTFTDiscriminator(cfg)


def disc_loss(disc, real, fake):
    """Hinge loss for the discriminator (fake detached by the caller)."""
    loss = 0.0
    for (lr, _), (lf, _) in zip(disc(real), disc(fake)):
        loss = loss + F.relu(1 - lr).mean() + F.relu(1 + lf).mean()
    return loss / len(disc.discs)


def generator_adv_loss(disc, real, fake):
    """(hinge adversarial loss, relative L1 feature matching) for the VAE's update."""
    adv, feat = 0.0, 0.0
    for (_, fr), (lf, ff) in zip(disc(real), disc(fake)):
        adv = adv + F.relu(1 - lf).mean()
        rel = [(a.detach() - b).abs().mean() / (a.detach().abs().mean() + 1e-7)
               for a, b in zip(fr, ff)]
        feat = feat + sum(rel) / len(fr)
    return adv / len(disc.discs), feat / len(disc.discs)


class Adversary:
    """VAE-GAN (paper Eq. 2; Mimi and EnCodec, arXiv 2410.00037 §3.3.1 and 2210.13438 §3.4): the
    multi-scale STFT discriminator above with its own AdamW, trained from step cfg.disc_start *
    steps on (a reconstruction-only warm-up before, as RAVE and ParallelWaveGAN do). Each step: one
    hinge update of D on the detached reconstruction, then the generator's adversarial +
    feature-matching terms under the updated D, added to the reconstruction losses (the paper keeps
    them for music)."""

    def __init__(self, cfg, seed, device, ddp):
        self.cfg, self.ddp = cfg, ddp
        with torch.random.fork_rng(devices=[]):  # D's init leaves the VAE's noise draws (global
                                                 # RNG) as they were
            torch.manual_seed(seed + 1)          # the same D on every DDP replica
            self.disc = make_discriminator(cfg).to(device)
        self.opt = torch.optim.AdamW(self.disc.parameters(), lr=0.0, betas=(0.8, 0.99))

    def __call__(self, step, steps, lr, real, fake, stats):
        if step < round(self.cfg.disc_start * steps):
            return 0.0
        self.disc.requires_grad_(True)
        d_loss = disc_loss(self.disc, real, fake.detach())
        self.opt.zero_grad(set_to_none=True)
        d_loss.backward()
        if self.ddp:  # one D on every replica: average its gradients as DDP does the VAE's
            for p in self.disc.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), 10.0)
        for g in self.opt.param_groups:
            g['lr'] = lr
        self.opt.step()
        self.disc.requires_grad_(False)  # the generator's terms below train the VAE only
        adv, feat = generator_adv_loss(self.disc, real, fake)
        stats.update(d_loss=d_loss.item(), g_adv=adv.item(), g_feat=feat.item())
        return self.cfg.adv_weight * adv + self.cfg.feat_weight * feat

    def describe(self, steps):
        n = sum(p.numel() for p in self.disc.parameters())
        return f'{n / 1e6:.2f}M params from step {round(self.cfg.disc_start * steps)}'

    def state_dict(self):
        return {'disc': self.disc.state_dict(), 'disc_optimizer': self.opt.state_dict()}

    def load_state_dict(self, ck):
        """From a training checkpoint. One without a discriminator (a run trained without it)
        resumes as a VAE-GAN if it stopped before disc_start: up to there the two runs take the same
        steps."""
        if 'disc' in ck:
            self.disc.load_state_dict(ck['disc'])
            self.opt.load_state_dict(ck['disc_optimizer'])
        elif ck['step'] > round(self.cfg.disc_start * ck['steps']):
            raise SystemExit(f"error: the checkpoint has no discriminator and is at step "
                             f"{ck['step']}, past the GAN's start (step "
                             f"{round(self.cfg.disc_start * ck['steps'])}): resume before it")


def load(path, device='cpu'):
    """(VAE in eval mode, checkpoint dict) from a vae.pt written by train.py."""
    ck = torch.load(path, map_location=device, weights_only=False)
    model = VAE(Config(**ck['config'])).to(device)
    model.load_state_dict(ck['model'])
    return model.eval(), ck
