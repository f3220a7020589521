"""
The audio VAE of CALM (paper §2 and Table 13; notes §2, §10a): a Mimi-like causal codec (SEANet
convolutional encoder/decoder with a Transformer in the bottleneck) whose residual vector quantiser
is replaced by a Gaussian bottleneck. The encoder outputs a mean and a log-variance per 80 ms frame,
training samples with the reparameterisation trick and pays a KL to N(0, I); the language model
reads the (standardised) posterior mean.

    vae = VAE(TOY)
    x = vae.encode(wav)       # [B, T] -> [B, ceil(T / hop), D], standardised posterior mean
    wav_hat = vae.decode(x)   # [B, S, D] -> [B, S * hop]
    loss, stats = vae(wav)    # training: L1 + multi-resolution STFT + kl_weight * KL

Everything is causal: latent s depends only on samples < (s + 1) * hop, and output sample t only on
latents <= t // hop, so the codec can stream (paper §2: Mimi is causal; CALM generates frame by frame).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    sample_rate: int = 24000
    ratios: tuple = (6, 5, 4, 4, 4)  # SEANet convention: decoder order; the encoder applies them reversed
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
    istft_hop: int = 0               # 0: transposed convs down to the waveform (SEANet). >0: the decoder stops
                                     # at hop/istft_hop frames/s and an inverse-STFT head (Vocos) makes the audio
    activation: str = 'elu'          # 'elu' (SEANet/Mimi) or 'snake' (periodic; BigVGAN/DAC)
    discriminator: bool = False      # VAE-GAN: multi-scale STFT discriminator (make_discriminator)
    disc_channels: int = 32
    adv_weight: float = 0.1
    feat_weight: float = 1.0


# Paper's speech VAE (Table 13): 24 kHz, ratios 6,5,4,4,4 -> hop 1920 -> 12.5 frames/s, 32 dims,
# 8 Transformer layers each side, 10 s context, KL weight 0.01, VAE-GAN. (For a GPU.)
PAPER = Config(discriminator=True)

# Toy (CPU): same 12.5 frames/s. ratios 8,5,4,4,3 -> the encoder first downsamples by 3 (cheap first
# stage at 24 kHz, where compute per channel is highest), small widths, a 2-layer Transformer of 128 in
# the bottleneck. The decoder upsamples x8 to 100 frames/s and an iSTFT head (n_fft 960) makes the audio:
# measured on this CPU, the all-conv SEANet decoder had not yet learnt to produce tones after 300 steps
# (the toy budget is ~600), the iSTFT head does. 16 latent dims: pure-tone toy music needs little rate,
# and a compact latent is easier for the LM. time_weight 0.1 (EnCodec's lambda_t): the waveform L1
# fights phase freedom early in training.
TOY = Config(ratios=(8, 5, 4, 4, 3), channels=8, max_channels=256, latent_dim=16, d_model=128,
             n_transformer_layers=2, n_heads=4, context=16, kl_weight=0.001, time_weight=0.1, istft_hop=240,
             stft_sizes=(2048, 1024, 512, 256, 128))


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
    """Transposed conv trimmed on the right: length L -> L * stride, output t sees inputs <= t // stride."""

    def forward(self, x):
        y = super().forward(x)
        trim = self.kernel_size[0] - self.stride[0]
        return y[..., :y.shape[-1] - trim] if trim > 0 else y


class Snake(nn.Module):
    """x + sin^2(a x) / a with a learned per channel (Ziyin et al. 2020; BigVGAN, DAC): a periodic bias
    that makes generating tones much easier than with ELU."""

    def __init__(self, ch):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, ch, 1))

    def forward(self, x):
        return x + torch.sin(self.alpha * x).pow(2) / (self.alpha + 1e-9)


def act(cfg, ch):
    return Snake(ch) if cfg.activation == 'snake' else nn.ELU()


class ResidualUnit(nn.Module):
    """SEANet residual unit: act, causal conv k=3 (dilated), act, conv k=1, plus skip."""

    def __init__(self, ch, cfg, dilation=1):
        super().__init__()
        self.act1, self.act2 = act(cfg, ch), act(cfg, ch // 2)
        self.conv1 = CausalConv1d(ch, ch // 2, 3, dilation=dilation)
        self.conv2 = CausalConv1d(ch // 2, ch, 1)

    def forward(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.context = cfg.n_heads, cfg.context
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        # Causal sliding window (Mimi's bottleneck Transformer attends to a fixed past context), so a
        # model trained on short crops behaves the same on long files.
        i = torch.arange(S, device=x.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.context)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, S, C))


def rope(x, base=10000.0):
    """Rotary position embedding on [B, H, S, hd]: relative positions, any length."""
    S, hd = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = torch.arange(S, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Bottleneck(nn.Module):
    """Linear in, a few causal Transformer blocks over frames, LayerNorm, linear out ([B, C, S] layout)."""

    def __init__(self, cfg, c_in, c_out):
        super().__init__()
        self.inp = nn.Linear(c_in, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_transformer_layers))
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
        self.cfg = cfg
        self.hop = math.prod(cfg.ratios)
        self.frame_rate = cfg.sample_rate / self.hop
        chans = [min(cfg.channels * 2 ** i, cfg.max_channels) for i in range(len(cfg.ratios) + 1)]
        # Encoder (SEANet): conv k7, then per ratio (smallest first): residual units, ELU, strided conv
        # (kernel 2r) doubling the channels; then the bottleneck Transformer and a head for mean/logvar.
        enc = [CausalConv1d(1, chans[0], 7)]
        for i, r in enumerate(reversed(cfg.ratios)):
            enc += [ResidualUnit(chans[i], cfg) for _ in range(cfg.n_residual)]
            enc += [act(cfg, chans[i]), CausalConv1d(chans[i], chans[i + 1], 2 * r, stride=r)]
        enc += [act(cfg, chans[-1])]
        self.encoder = nn.Sequential(*enc)
        self.enc_bottleneck = Bottleneck(cfg, chans[-1], 2 * cfg.latent_dim)
        # Decoder mirrors it: bottleneck Transformer, then per ratio (largest first): ELU, transposed
        # conv halving the channels (trimmed right: causal), residual units; ELU and conv k7 to audio.
        self.dec_bottleneck = Bottleneck(cfg, cfg.latent_dim, chans[-1])
        dec, up, c = [], 1, chans[-1]
        for i, r in zip(range(len(cfg.ratios), 0, -1), cfg.ratios):
            if cfg.istft_hop and up * cfg.istft_hop == self.hop:
                break
            dec += [act(cfg, chans[i]), CausalConvTranspose1d(chans[i], chans[i - 1], 2 * r, stride=r)]
            dec += [ResidualUnit(chans[i - 1], cfg) for _ in range(cfg.n_residual)]
            up, c = up * r, chans[i - 1]
        if cfg.istft_hop:
            # iSTFT head: per STFT frame a log-magnitude and a phase for each of n_fft/2+1 bins. A conv
            # decoder must learn phase-coherent oscillation sample by sample, which takes far more steps
            # than the toy budget; the inverse STFT gives periodic signals for free (Vocos, Siuzdak 2023).
            assert up * cfg.istft_hop == self.hop, 'istft_hop must be hop / (product of leading ratios)'
            self.n_fft = 4 * cfg.istft_hop
            dec += [act(cfg, c), CausalConv1d(c, self.n_fft + 2, 7)]
            self.register_buffer('istft_window', torch.hann_window(self.n_fft), persistent=False)
        else:
            dec += [act(cfg, chans[0]), CausalConv1d(chans[0], 1, 7)]
        self.decoder = nn.Sequential(*dec)
        self.apply(init_weights)
        # Start with a narrow posterior (std e^-2): with logvar = 0 the sampled latent is pure noise at
        # init, the decoder learns to ignore it and the KL then collapses the posterior to the prior.
        nn.init.constant_(self.enc_bottleneck.out.bias[cfg.latent_dim:], -4.0)
        # Latent statistics for the LM (notes §2): encode() returns (mu - mean) / std, decode() inverts.
        self.register_buffer('latent_mean', torch.zeros(cfg.latent_dim))
        self.register_buffer('latent_std', torch.ones(cfg.latent_dim))

    def n_frames(self, n_samples):
        return -(-int(n_samples) // self.hop)

    def posterior(self, wav):
        """wav [B, T] -> raw (mu, logvar), each [B, S, D], S = ceil(T / hop) (right zero-padding)."""
        T = wav.shape[-1]
        x = F.pad(wav, (0, self.n_frames(T) * self.hop - T))[:, None]
        h = self.enc_bottleneck(self.encoder(x))  # [B, 2D, S]
        mu, logvar = h.transpose(1, 2).chunk(2, dim=-1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_raw(self, z):
        """Raw latents [B, S, D] -> wav [B, S * hop]."""
        h = self.decoder(self.dec_bottleneck(z.transpose(1, 2)))
        if not self.cfg.istft_hop:
            return h[:, 0]
        return self.istft(h, z.shape[1] * self.hop)

    def istft(self, h, n):
        """[B, n_fft + 2, F] (log-magnitudes, phases) -> [B, n]. Frame f is windowed and added at samples
        [f * istft_hop, f * istft_hop + n_fft), and depends on latents <= f * istft_hop // hop: causal."""
        logmag, phase = h.float().chunk(2, dim=1)
        spec = torch.exp(logmag.clamp(max=6.0)) * torch.exp(1j * phase)
        frames = torch.fft.irfft(spec.transpose(1, 2), n=self.n_fft) * self.istft_window  # [B, F, n_fft]
        L = (frames.shape[1] - 1) * self.cfg.istft_hop + self.n_fft
        out = F.fold(frames.transpose(1, 2), (1, L), (1, self.n_fft), stride=(1, self.cfg.istft_hop))
        return out[:, 0, 0, :n] / 1.5  # sum of squared Hann windows at 75% overlap = 1.5

    @torch.no_grad()
    def encode(self, wav):
        mu, _ = self.posterior(wav)
        return (mu - self.latent_mean) / self.latent_std

    @torch.no_grad()
    def decode(self, latents):
        return self.decode_raw(latents * self.latent_std + self.latent_mean)

    @torch.no_grad()
    def set_latent_stats(self, latents_raw):
        """Per-dimension mean and std of raw posterior means [N, D] (std floored: near-constant dims)."""
        x = latents_raw.reshape(-1, self.cfg.latent_dim).float()
        self.latent_mean.copy_(x.mean(0))
        self.latent_std.copy_(x.std(0).clamp_min(1e-3))

    def forward(self, wav):
        """Training loss on wav [B, T]: returns (loss, stats). Paper §2 / notes §2, minus the adversarial
        terms (computed outside with make_discriminator when cfg.discriminator)."""
        cfg = self.cfg
        mu, logvar = self.posterior(wav)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()  # reparameterisation trick
        wav_hat = self.decode_raw(z)[:, :wav.shape[-1]]
        l_time = (wav_hat - wav).abs().mean()
        l_freq = stft_loss(wav, wav_hat, cfg.stft_sizes)
        l_kl = kl_divergence(mu, logvar)
        loss = cfg.time_weight * l_time + cfg.freq_weight * l_freq + cfg.kl_weight * l_kl
        self.last_recon = wav_hat  # for the adversarial terms, when a discriminator is trained outside
        return loss, {'loss': loss.item(), 'l1': l_time.item(), 'stft': l_freq.item(), 'kl': l_kl.item()}

    loss = forward


def init_weights(mod):
    """Variance-preserving conv init (std = gain / sqrt(fan_in), zero bias). PyTorch's default init shrinks
    the signal ~2x per conv: after 10 convs the input-dependent part of the encoder output is ~1% of
    its biases, the latent carries nothing and training stalls (measured: no learning in 200 steps)."""
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
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over latent dims, averaged over frames (nats/frame)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1).mean()


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
# Optional VAE-GAN discriminator (paper §2 follows Mimi / EnCodec: multi-scale STFT discriminator with
# hinge adversarial loss and L1 feature matching). Trained by the caller with its own optimizer.

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
        S = torch.stft(wav, self.n_fft, self.n_fft // 4, window=win, return_complex=True, pad_mode='constant')  # [B, F, T]
        h = torch.stack([S.real, S.imag], 1).transpose(2, 3)  # [B, 2, T, F]: convolve along frequency
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
        feat = feat + sum((a.detach() - b).abs().mean() / (a.detach().abs().mean() + 1e-7) for a, b in zip(fr, ff)) / len(fr)
    return adv / len(disc.discs), feat / len(disc.discs)
