"""
CALM: Continuous Audio Language Model (Rouard et al., arXiv 2509.06926), minimal and readable.
Read it after data.py and vae.py, next to the paper; train.py trains it, sample.py samples it.
T_long and T_short are transformer.py's causal Transformer (RoPE, ring-buffer KV cache).

    x_1..x_S  continuous VAE latents (standardised, so sigma_d = 1)
    z_long_s  = T_long(noisy x_<s)               causal Transformer, long context     (paper Eq. 3)
    z_short_s = T_short(clean x_{s-K}..x_{s-1})  sliding-window Transformer, K frames (paper Eq. 3)
    z_s       = z_long_s + z_short_s
    x_s      ~ head(noise, t, z_s)     MAR adaLN MLP trained with TrigFlow or sCT (sCM §3-§4)

"paper" is the CALM paper, arXiv 2509.06926 (its Eq. 3: the training objective, with z_s as above
and the noise-augmented inputs); "sCM §n" refers to Lu & Song, arXiv 2410.11081 (§3 TrigFlow and
sCT, §4.1 architecture, §4.2 training objective tricks); "MAR" to Li et al., arXiv 2406.11838;
"LSD paper" to Boffi et al., arXiv 2505.18825 (Lagrangian self-distillation: flow_map).

Consistency models, what the head is (sCM §2-§4). TrigFlow noises a frame x_0 along a path
x_t = cos t x_0 + sin t z, z ~ N(0, sigma_d^2 I), from data at t = 0 to noise at t = pi/2; the
probability-flow ODE (PF-ODE) dx_t/dt = E[cos t z - sin t x_0 | x_t] moves every noise back to one
frame. The head's output F(x_t / sigma_d, t, z_s) predicts that velocity (in units of sigma_d): a
diffusion head is trained so (trigflow_error) and integrates the ODE in many steps
(trigflow_sample). A consistency model sends every point of a path to its start with the same F,
f(x_t, t) = cos t x_t - sin t sigma_d F (f(x, 0) = x, and df/dt = 0 along the path): one call maps
noise to a frame (consistency_sample). sCT trains df/dt = 0 directly: its loss ||F - F^- - g||^2,
F^- = F under stop-gradient, g = cos t df^-/dt (sct_tangent), has the gradient -2 g dF/dtheta at
F = F^- (sCM's continuous-time consistency gradient); its value says nothing. g uses the dx_t/dt of
the (x_0, z) that made x_t, a one-sample estimate, divided by a norm (+ 0.1) to bound each step
(sCM §4.2; sct_error). The adaptive weight w(t) turns each row's error e into e^w(t) e - w(t),
minimal (1 + log e) at w = -log e: every t weighs the same, and the loss is negative as e is small;
train.py's held-out val_mse shows progress instead. `python calm.py` counts and times.
"""
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import transformer


@dataclass
class Config:
    latent_dim: int = 32          # D, set from the VAE
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    context: int = 100            # frames the backbone attends to (rolling KV cache past it)
    short_context: int = 10       # K of the short-context Transformer (paper: 10); 0 disables it
    short_layers: int = 2
    head_width: int = 256
    head_blocks: int = 3
    head_loss: str = 'consistency'   # 'trigflow' (diffusion), 'consistency' (sCT), 'lsd' (flow_map)
    head_batch_mul: int = 4       # M: each z_s reused M times with fresh (noise, t) (MAR; paper: 8)
    noise_aug: bool = True        # corrupt the backbone's inputs (paper Eq. 3; arXiv 2411.18447)
    noise_max: float = 1.0        # noise level k ~ U(0, noise_max) (paper Eq. 3: U(0, 1))
    sigma_d: float = 1.0          # data std of the (standardised) latents, TrigFlow's sigma_d
    P_mean: float = -1.0          # time proposal: log sigma ~ N(P_mean, P_std^2) (sCM's CIFAR)
    P_std: float = 1.4
    tangent_warmup: int = 1000    # steps over which r ramps 0 -> 1 (sCM §4.2 "tangent warmup")
    diffusion_steps: int = 0      # consistency: first train this many steps with the TrigFlow loss
    lsd_frac: float = 0.25        # lsd: 1 head row in round(1 / lsd_frac) also carries the LSD term
    lsd_weight: float = 1.0       # lsd: weight of the LSD term beside the diagonal's flow matching
    adaptive_weight: bool = True  # learned w(t) (sCM §4.2; paper Eq. 3 trains w jointly)
    t_eps: float = 1e-3           # clamp t into [t_eps, pi/2 - t_eps] for training
    time_scale: float = 10.0      # fastest time feature, rad per unit t (time_features)
    dropout: float = 0.0
    n_text: int = 0               # text vocabulary size (data.VOCAB); 0 = unconditional
    cond_dropout: float = 0.2     # P(null condition) per training sequence (our choice)
    # Levers for a small CPU budget (ours, not the paper's), all off by default:
    readout_weight: float = 0.0   # > 0: a linear readout of x_s from z_s joins the loss (forward)
    sct_head_only: bool = False   # the sCT loss trains the head only, z detached (sct_error)
    noise_ramp: int = 0           # > 0: noise augmentation ramps up over this many steps
    # Sampling defaults (generate's temperature overrides tau): tau scales the head's noise variance
    # (the paper's 'noise'), or, 'mean' (ours, needs the readout), the sample's spread around the
    # readout's mean estimate (sample_head)
    temperature: float = 0.8      # the paper's best for speech continuation (pocket-tts: 0.7)
    temperature_around: str = 'noise'


# Presets. PAPER: the music LM is MusicGen-medium sized (48 layers x 1536) on 128-dim latents at
# 25 Hz; the head and short-Transformer sizes are our guesses. Never trained here.
PAPER = Config(latent_dim=128, d_model=1536, n_layers=48, n_heads=24, context=750, short_context=10,
               short_layers=4, head_width=1536, head_blocks=6, head_batch_mul=8,
               tangent_warmup=10000)
# TOY: sized for 2 CPU cores by time to quality (docs/toy.md): a small head (128 x 2, M = 1); the
# first 4500 of 5000 LM steps train TrigFlow, then sCT trains the head alone while a linear readout
# trains the backbone. No short-context Transformer: it made the toy worse (docs/findings.md).
# Sampled at tau = 0.1 around the readout's mean: at this budget the head's full spread costs notes.
TOY = Config(latent_dim=16, d_model=128, n_layers=3, n_heads=4, context=64, short_context=0,
             short_layers=2, head_width=128, head_blocks=2, head_batch_mul=1, tangent_warmup=200,
             diffusion_steps=4500, readout_weight=1.0, sct_head_only=True, temperature=0.1,
             temperature_around='mean')
# SMALL (one GPU, train.py --preset small): 12 layers x 512 over 20 s, the paper's K = 10 and M = 8,
# a head of pocket-tts's size and the toy's TrigFlow-then-sCT schedule; sizes, not a tuned recipe.
SMALL = Config(latent_dim=32, d_model=512, n_layers=12, n_heads=8, context=250, short_context=10,
               short_layers=2, head_width=512, head_blocks=6, head_batch_mul=8, diffusion_steps=600)

HALF_PI = math.pi / 2


# --------------------------------------------------------------------------------------------------
# MLP head: MAR's residual MLP with adaptive LayerNorm (MAR §3.3 / its SimpleMLPAdaLN), computing
# F_theta(x_t / sigma_d, t, z). Init as MAR: xavier Linear, zero biases, zero adaLN modulation and
# final layer, so the head starts as the zero map and every block as the identity.

def time_features(t, dim, scale):
    """Sinusoidal features [N, dim] of t [N] in [0, pi/2] (c_noise(t) = t, sCM §4.1), at `scale`
    down to scale / 10^4 rad per unit t; a large scale makes sCT's dF/dt large and noisy
    (docs/consistency.md)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = (scale * t)[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.ln = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))

    def forward(self, h, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return h + gate * self.mlp(self.ln(h) * (1 + scale) + shift)


class Head(nn.Module):
    def __init__(self, D, d_cond, w, n_blocks, n_freq=256, time_scale=10.0, two_times=False):
        super().__init__()
        self.n_freq, self.time_scale = n_freq, time_scale
        self.inp = nn.Linear(D, w)
        mlp = lambda: nn.Sequential(nn.Linear(n_freq, w), nn.SiLU(), nn.Linear(w, w))
        self.time = mlp()
        self.time_end = mlp() if two_times else None   # the end time s of a flow map (LSD heads)
        self.cond = nn.Linear(d_cond, w)
        self.blocks = nn.ModuleList([ResBlock(w) for _ in range(n_blocks)])
        self.ln_f = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.ada_f = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.out = nn.Linear(w, D)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in [*self.time, *(self.time_end or [])]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for lin in [b.ada[-1] for b in self.blocks] + [self.ada_f[-1], self.out]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, z, s=None):
        """x [N, D] = x_t / sigma_d, t [N], z [N, d_cond] -> F_theta [N, D]. A two-time head also
        reads the end time s [N] (None: s = t, the diagonal, where F is the TrigFlow velocity)."""
        tf = lambda u: time_features(u, self.n_freq, self.time_scale)
        c = self.time(tf(t)) + self.cond(z)
        if self.time_end is not None:   # added, as the time and condition embeddings are
            c = c + self.time_end(tf(t if s is None else s))
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.ada_f(c).chunk(2, dim=-1)
        return self.out(self.ln_f(h) * (1 + scale) + shift)


# --------------------------------------------------------------------------------------------------
# TrigFlow and consistency functions, and the samplers, for any Fn(x / sigma_d, t) -> F (tests run
# them on an exact F). Temperature tau (the paper's Gaussian temperature): every noise draw has std
# sqrt(tau) sigma_d, so a Gaussian target's output variance scales by tau.

def trigflow_interp(x0, noise, t):
    """TrigFlow (sCM §3): x_t = cos t x_0 + sin t z, z ~ N(0, sigma_d^2 I), and its velocity
    v_t = dx_t/dt = cos t z - sin t x_0 (the diffusion target). t [N] -> broadcast over D."""
    cos, sin = t.cos()[:, None], t.sin()[:, None]
    return cos * x0 + sin * noise, cos * noise - sin * x0


def consistency_fn(Fn, xt, t, sigma_d=1.0):
    """f_theta(x_t, t) = cos t x_t - sin t sigma_d F(x_t / sigma_d, t) (sCM §3): f(x, 0) = x."""
    return t.cos()[:, None] * xt - t.sin()[:, None] * sigma_d * Fn(xt / sigma_d, t)


def sct_tangent(Fn, xt, t, dxt, sigma_d=1.0, r=1.0):
    """sCT tangent (sCM §3, §4.2 tangent warmup r), before normalisation, cos t df^-/dt at r = 1:
        g = -cos^2 t (sigma_d F^- - dx_t/dt) - r cos t sin t (x_t + sigma_d dF^-/dt)
    dF^-/dt: one forward-mode JVP along (dx_t/dt / sigma_d, 1), both tangents scaled by cos t sin t
    as sCM does for stability. Returns (F^-, g), without gradient (theta^- = stop-grad theta)."""
    cos, sin = t.cos()[:, None], t.sin()[:, None]
    cs = cos * sin
    with torch.no_grad():
        F_minus, dF_cs = torch.func.jvp(Fn, (xt / sigma_d, t), (cs * dxt / sigma_d, cs[:, 0]))
        g = -cos ** 2 * (sigma_d * F_minus - dxt) - r * (cs * xt + sigma_d * dF_cs)
    return F_minus, g


def consistency_times(steps):
    """Times of N-step consistency sampling from pi/2: sCM §5 takes t_mid = 1.1 for 2 steps; more
    continue geometrically in sigma = tan t down to 0.25 (ours): N=4 -> (pi/2, 1.1, 0.61, 0.245)."""
    if steps == 1:
        return [HALF_PI]
    sig = torch.logspace(math.log10(math.tan(1.1)), math.log10(0.25), steps - 1).tolist()
    return [HALF_PI] + [math.atan(s) for s in sig]


def consistency_sample(Fn, shape, steps=1, temperature=1.0, sigma_d=1.0, generator=None, times=None,
                       device=None):
    """sCM multistep sampling (sCM §3): x_0 = f(x_t, t), re-noised to the next t between steps."""
    times = consistency_times(steps) if times is None else times
    std = math.sqrt(temperature) * sigma_d
    N = shape[0]
    x0 = None
    for i, t in enumerate(times):
        noise = std * torch.randn(shape, generator=generator, device=device)
        xt = noise if i == 0 else math.cos(t) * x0 + math.sin(t) * noise
        x0 = consistency_fn(Fn, xt, torch.full((N,), t, device=device), sigma_d)
    return x0


def trigflow_times(steps, tan_max=160.0, tan_min=0.004, rho=7.0):
    """ODE grid pi/2 = t_0 > ... > t_steps = 0: EDM's rho = 7 schedule in sigma / sigma_d = tan t
    (EDM's 80 and 0.002 over its sigma_data 0.5); a grid uniform in t starves the small-t end."""
    if steps == 1:
        return [HALF_PI, 0.0]
    i = torch.arange(steps - 1, dtype=torch.float64) / max(steps - 2, 1)
    tan = (tan_max ** (1 / rho) + i * (tan_min ** (1 / rho) - tan_max ** (1 / rho))) ** rho
    return [HALF_PI] + [math.atan(v) for v in tan.tolist()] + [0.0]


def trigflow_sample(Fn, shape, steps=100, temperature=1.0, sigma_d=1.0, generator=None,
                    device=None):
    """Integrate the PF-ODE dx/dt = sigma_d F(x/sigma_d, t) from pi/2 to 0 (sCM §3) by DDIM steps
    x_s = cos(t-s) x_t - sin(t-s) sigma_d F(x_t/sigma_d, t): EDM's Euler step in x/cos t; from pi/2
    to 0 in one step, the consistency map f."""
    x = math.sqrt(temperature) * sigma_d * torch.randn(shape, generator=generator, device=device)
    ts = trigflow_times(steps)
    for t, s in zip(ts[:-1], ts[1:]):
        tt = torch.full((shape[0],), t, device=device)
        x = math.cos(t - s) * x - math.sin(t - s) * sigma_d * Fn(x / sigma_d, tt)
    return x


# Lagrangian self-distillation (LSD paper; docs/consistency.md): the head learns the flow map
# X_{t->s} of the PF-ODE, x_t to x_s on its path, s <= t (the paper's X_{s,t}, in TrigFlow's angle).

def flow_map(Fn, xt, t, s, sigma_d=1.0):
    """X_{t->s}(x) = cos(t-s) x - sin(t-s) sigma_d F(x / sigma_d, t, s): trigflow_sample's DDIM
    step with an F that also reads s. X_{t->t} = x and d/ds X at s = t is sigma_d F(x, t, t), so
    the diagonal is the TrigFlow velocity; X_{t->0} is sCM's consistency function f(x_t, t)."""
    d = (t - s)[:, None]
    return d.cos() * xt - d.sin() * sigma_d * Fn(xt / sigma_d, t, s)


def lsd_residual(Fn, xt, t, s, sigma_d=1.0):
    """d/ds X_{t->s}(x) - sg[sigma_d F(X / sigma_d, s, s)] [N, D]: the map solves the PF-ODE in its
    end time (the LSD paper's Lagrangian equation), its teacher the network's own diagonal. dF/ds
    by one JVP in s: unlike sCT's tangent, never through F's Jacobian in x (docs/consistency.md)."""
    d = (t - s)[:, None]
    F, dF_ds = torch.func.jvp(lambda e: Fn(xt / sigma_d, t, e), (s,), (torch.ones_like(s),))
    X = d.cos() * xt - d.sin() * sigma_d * F
    dX_ds = d.sin() * xt + d.cos() * sigma_d * F - d.sin() * sigma_d * dF_ds   # d/ds flow_map
    with torch.no_grad():
        target = sigma_d * Fn(X / sigma_d, s, s)
    return dX_ds - target


def flow_map_sample(Fn, shape, steps=1, temperature=1.0, sigma_d=1.0, generator=None, times=None,
                    device=None):
    """Jumps x <- X_{t_i -> t_i+1}(x) on a grid uniform in the angle (pocket-tts: in its time) from
    noise of variance temperature sigma_d^2; Fn(x_scaled, t, s) -> F. One draw: maps compose."""
    times = times or [HALF_PI * (1 - i / steps) for i in range(steps + 1)]
    x = math.sqrt(temperature) * sigma_d * torch.randn(shape, generator=generator, device=device)
    full = lambda v: torch.full((shape[0],), v, device=device)
    for t, s in zip(times[:-1], times[1:]):
        x = flow_map(Fn, x, full(t), full(s), sigma_d)
    return x


def short_windows(K, n_layers):
    """Per-layer windows of T_short whose receptive field is exactly the last K frames: stacked
    windows reach sum(w_l - 1) + 1 positions, so K - 1 is split over the layers (K=10, 2 layers ->
    5, 6): training stays one causal pass and T_short never sees x_{s-K-1}."""
    extra = [(K - 1) // n_layers + (1 if i < (K - 1) % n_layers else 0) for i in range(n_layers)]
    return [1 + e for e in extra][::-1]


# --------------------------------------------------------------------------------------------------

def check_config(cfg):
    """One-line errors for sampling settings the model cannot honour."""
    if cfg.temperature_around not in ('noise', 'mean'):
        raise ValueError(f"temperature_around must be 'noise' or 'mean', not "
                         f"{cfg.temperature_around!r}")
    if cfg.temperature_around == 'mean' and cfg.readout_weight <= 0:
        raise ValueError("sampling around the mean needs the readout's mean estimate: this model "
                         "was trained without one (readout_weight = 0)")


class CALM(nn.Module):
    """The continuous LM. Its interface is the one every LM of calm has (rq.py's discrete ones too,
    pipeline.KINDS): forward (the training loss), held_out, generate, and the per-frame pieces
    new_state, step_backbone, sample_head that the evaluation times."""
    kind = 'calm'      # the name train.py --model takes and calm.pt records
    multistep = True   # its head samples in any number of steps (a discrete LM: one per code)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, d = cfg.latent_dim, cfg.d_model
        check_config(cfg)
        self.long = transformer.Transformer(D, d, cfg.n_heads, [cfg.context] * cfg.n_layers,
                                            cfg.dropout)
        self.short = None
        if cfg.short_context > 0:
            windows = short_windows(cfg.short_context, cfg.short_layers)
            self.short = transformer.Transformer(D, d, cfg.n_heads, windows, cfg.dropout)
        self.head = Head(D, d, cfg.head_width, cfg.head_blocks, time_scale=cfg.time_scale,
                         two_times=cfg.head_loss == 'lsd')
        # Text conditioning (our conditioner): one embedding per word, id n_text = padding = the
        # null condition (a zero row: the empty description). See CALM.condition.
        self.text = None
        if cfg.n_text > 0:
            self.text = nn.Embedding(cfg.n_text + 1, d, padding_idx=cfg.n_text)
            nn.init.normal_(self.text.weight[:cfg.n_text], std=0.02)
        # learned log-variance weight w(t) of sCM §4.2, zero-init (starts as the plain MSE)
        self.weight_net = nn.Linear(128, 1) if cfg.adaptive_weight else None
        if self.weight_net is not None:
            nn.init.zeros_(self.weight_net.weight)
            nn.init.zeros_(self.weight_net.bias)
        # linear readout of x_s from z_s (cfg.readout_weight; a training loss, never sampled)
        self.readout = nn.Linear(d, D) if cfg.readout_weight > 0 else None

    # --- conditioning z_s = z_long_s + z_short_s (paper Eq. 3) ---
    def noise_augment(self, x, step=None):
        """x~_s = sqrt(k_s) eps + sqrt(1 - k_s) x_s, one k_s ~ U(0, noise_max) per frame (paper
        Eq. 3: U(0, 1)); targets and T_short's inputs stay clean. cfg.noise_ramp > 0: the top of k
        ramps up from 0 over noise_ramp steps (copying the past is learnt sooner from clean x)."""
        top = self.cfg.noise_max
        if self.cfg.noise_ramp > 0 and step is not None:
            top = top * min(1.0, step / self.cfg.noise_ramp)
        k = top * torch.rand(x.shape[0], x.shape[1], 1, device=x.device)
        return k.sqrt() * torch.randn_like(x) + (1 - k).sqrt() * x

    def conditioning(self, x_long, x_short, c=None):
        """z [B, S, d] for every frame: T_long reads x_long (noisy in training), T_short clean
        x_short. c [B, d]: the text condition, seen by T_long only (CALM.condition)."""
        z = self.long(x_long, c)
        return z + self.short(x_short) if self.short is not None else z

    def condition(self, text):
        """text [B, L] word ids (pad = cfg.n_text) -> c [B, d], the sum of the word embeddings (all
        pads: c = 0, the unconditional network). Ours (the paper's text conditioning is not
        published): c is ADDED to every input of T_long, as a prefix would leave the rolling KV
        cache; T_short stays unconditioned. Training drops c with probability cfg.cond_dropout so
        that latent CFG (classifier-free guidance, Ho & Salimans, arXiv 2207.12598) has z_uncond."""
        if self.text is None:
            raise ValueError('this model has no text conditioning (n_text = 0): sample without '
                             '--text')
        c = (self.text(text) * (text != self.cfg.n_text)[..., None]).sum(1)  # pads count 0
        if self.training and self.cfg.cond_dropout > 0:
            keep = torch.rand(c.shape[0], device=c.device) >= self.cfg.cond_dropout
            c = c * keep[:, None].to(c.dtype)
        return c

    def forward(self, x, step=0, text=None):
        """x [B, S, D] clean standardised latents, text [B, L] ids or None -> (loss, stats). Teacher
        forcing: predicts every x_s."""
        c = self.condition(text) if text is not None else None   # its draws come first
        x_long = self.noise_augment(x, step) if (self.training and self.cfg.noise_aug) else x
        z = self.conditioning(x_long, x) if c is None else self.conditioning(x_long, x, c)
        loss, stats = self.objective(z.reshape(-1, z.shape[-1]), x.reshape(-1, x.shape[-1]), step)
        if self.readout is not None:
            # the head's loss reaches the backbone mostly through large-t rows; this, every frame
            mse = ((self.readout(z) - x) ** 2).mean()
            loss = loss + self.cfg.readout_weight * mse
            stats['readout_mse'] = mse.item()
        return loss, stats

    # --- head losses ---
    def sample_t(self, n, device):
        """Log-normal proposal (sCM §4.2): the noise level sigma = sigma_d tan t is log-normal,
        log sigma ~ N(P_mean, P_std^2), so t = arctan(sigma / sigma_d)."""
        log_sigma = self.cfg.P_mean + self.cfg.P_std * torch.randn(n, device=device)
        t = torch.atan(log_sigma.exp() / self.cfg.sigma_d)
        return t.clamp(self.cfg.t_eps, HALF_PI - self.cfg.t_eps)

    def objective(self, z, x0, step=0):
        """The head's loss at this step: z [N, d], x0 [N, D] -> (loss, stats): each row's error by
        cfg.head_loss (trigflow_error, sct_error; LSD: TrigFlow on the diagonal, plus lsd_error),
        weighed by w(t). Each row repeated M times with its own (noise, t) (MAR §3.3)."""
        cfg, sd = self.cfg, self.cfg.sigma_d
        M = cfg.head_batch_mul
        z, x0 = z.repeat_interleave(M, 0), x0.repeat_interleave(M, 0)
        t = self.sample_t(x0.shape[0], x0.device)
        noise = sd * torch.randn_like(x0)
        xt, dxt = trigflow_interp(x0, noise, t)
        # A consistency run may start with diffusion_steps of the TrigFlow loss (docs/findings.md)
        tuning = cfg.head_loss == 'consistency' and step < cfg.diffusion_steps
        if cfg.head_loss in ('trigflow', 'lsd') or tuning:
            err, stats = self.trigflow_error(xt, dxt, t, z), {}
        elif cfg.head_loss == 'consistency':
            err, stats = self.sct_error(xt, dxt, t, z, step - cfg.diffusion_steps)
        else:
            raise ValueError(f"head_loss must be 'trigflow', 'consistency' or 'lsd', not "
                             f"{cfg.head_loss!r}")
        stats['mse'] = err.mean().item()
        if self.weight_net is not None:                   # e^{w(t)} ||.||^2 / D - w(t)  (sCM §4.2)
            w = self.weight_net(time_features(t, 128, cfg.time_scale))[:, 0]
            err = w.exp() * err - w
        loss = err.mean()
        if cfg.head_loss == 'lsd':
            lsd = self.lsd_error(z, x0)
            stats['lsd_mse'] = lsd.mean().item()
            loss = loss + cfg.lsd_weight * lsd.mean()
        stats['loss'] = loss.item()
        return loss, stats

    def trigflow_error(self, xt, dxt, t, z):
        """The diffusion loss ||sigma_d F - dx_t/dt||^2 / D of each row (sCM §3)."""
        sd = self.cfg.sigma_d
        return ((sd * self.head(xt / sd, t, z) - dxt) ** 2).mean(-1)

    def sct_error(self, xt, dxt, t, z, s):
        """The sCT loss ||F - F^- - g / (||g_u|| + 0.1)||^2 / D of each row (sCM §3-§4.2; paper
        Eq. 3) at step s of the sCT phase, and its stats (r, g_norm)."""
        cfg, sd = self.cfg, self.cfg.sigma_d
        r = min(1.0, s / cfg.tangent_warmup) if cfg.tangent_warmup > 0 else 1.0
        zd = z.detach()                  # theta^- = stop-grad(theta), the backbone's z included
        Fh = lambda a, b: self.head(a, b, zd)
        F_minus, g = sct_tangent(Fh, xt, t, dxt, sd, r)
        # Tangent normalisation (sCM §4.2) by the norm of the same tangent along an independent
        # noise u, not along dx_t/dt (our change): ||g|| depends on the x_0 that drew dx_t/dt and
        # biased the map; ||g_u|| does not. A second JVP (docs/consistency.md).
        _, g_u = sct_tangent(Fh, xt, t, sd * torch.randn_like(dxt), sd, r)
        g_scaled = g / (g_u.norm(dim=-1, keepdim=True) + 0.1)
        # cfg.sct_head_only: sCT's updates through z can undo what the TrigFlow phase taught T_long
        zh = zd if cfg.sct_head_only else z
        err = ((self.head(xt / sd, t, zh) - F_minus - g_scaled) ** 2).mean(-1)
        return err, {'r': r, 'g_norm': g.norm(dim=-1).mean().item()}

    def lsd_error(self, z, x0):
        """||lsd_residual||^2 / D on 1 head row in round(1 / lsd_frac), with its own noise and times
        s <= t uniform on the triangle, as the LSD paper draws them (pocket-tts's pairs and its
        learnt weight on this term did worse on the map test: docs/consistency.md)."""
        k, sd, eps = max(1, round(1 / self.cfg.lsd_frac)), self.cfg.sigma_d, self.cfg.t_eps
        z, x0 = z[::k], x0[::k]
        u = (HALF_PI * torch.rand(x0.shape[0], 2, device=x0.device)).clamp(eps, HALF_PI - eps)
        t, s = u.sort(1, descending=True).values.unbind(1)
        xt, _ = trigflow_interp(x0, sd * torch.randn_like(x0), t)
        Fn = lambda a, b, e: self.head(a, b, z, e)
        return (lsd_residual(Fn, xt, t, s, sd) ** 2).mean(-1)

    # --- generation: per-frame pieces, exposed so evaluators can time backbone vs head ---
    def new_state(self, B, device=None, text=None, guidance=None):
        """Caches for batch B. text [B, L] ids: conditional; with guidance (the latent CFG strength
        alpha) also guided, with a second T_long cache for the null branch ('long_null')."""
        state = {'long': self.long.new_cache(B, device),
                 'short': self.short.new_cache(B, device) if self.short is not None else None,
                 'c': None, 'alpha': None}
        if text is not None:
            state['c'] = self.condition(text.to(device))
            if guidance is not None:
                state['alpha'], state['long_null'] = guidance, self.long.new_cache(B, device)
        return state

    @torch.no_grad()
    def step_backbone(self, x_prev, state):
        """x_prev [B, D] (last frame, None at the start) -> z [B, d] for the next frame. Latent CFG
        (the paper's): z = z_uncond + alpha (z_cond - z_uncond) on T_long's output, then T_short's:
        one head call per frame. torch.lerp and two batch-B passes (not one 2B batch) make alpha = 1
        and 0 exactly the unguided conditional and unconditional sampling (tests)."""
        c, alpha = state.get('c'), state.get('alpha')
        z = self.long.step(x_prev, state['long'], c)
        if alpha is not None:   # the null branch: the same frames, c = None (the zero condition)
            z = torch.lerp(self.long.step(x_prev, state['long_null']), z, alpha)
        return z + self.short.step(x_prev, state['short']) if self.short is not None else z

    @torch.no_grad()
    def sample_head(self, z, steps=1, temperature=1.0, generator=None, times=None, around=None):
        """z [N, d] -> x [N, D]: consistency steps, flow-map jumps or ODE steps by cfg.head_loss,
        at temperature tau. around (default cfg.temperature_around) 'noise': tau is the variance of
        the head's noise (the paper's). 'mean': the head samples at tau = 1 and the sample's spread
        around the readout's mean estimate mu is scaled, mu + sqrt(tau) (x - mu): for a Gaussian
        p(x_s | z_s) the same tempered density, without feeding a 1-step map noise of a norm it
        never saw in training (docs/toy.md)."""
        around = around or self.cfg.temperature_around
        tau = 1.0 if around == 'mean' else temperature
        Fn = lambda x, t: self.head(x, t, z)
        shape, sd = (z.shape[0], self.cfg.latent_dim), self.cfg.sigma_d
        if self.cfg.head_loss == 'consistency':
            x = consistency_sample(Fn, shape, steps, tau, sd, generator, times, z.device)
        elif self.cfg.head_loss == 'lsd':
            Fn2 = lambda x, t, s: self.head(x, t, z, s)
            x = flow_map_sample(Fn2, shape, steps, tau, sd, generator, times, z.device)
        else:
            x = trigflow_sample(Fn, shape, steps, tau, sd, generator, z.device)
        if around == 'mean':
            mu = self.readout(z)
            x = mu + math.sqrt(temperature) * (x - mu)
        return x

    def check_sampling(self, steps=1, top_k=None):
        """One-line errors for sampling options this LM does not take."""
        if top_k is not None:
            raise ValueError('--top-k is for the discrete LMs (train.py --model rq/delay)')

    @torch.inference_mode()
    def generate(self, prompt=None, n_frames=100, steps=1, temperature=None, generator=None,
                 text=None, guidance=None, top_k=None, on_frame=None):
        """prompt [B, P, D] or None -> [B, n_frames, D] new frames, streamed with the KV caches.
        temperature: tau (None: cfg.temperature; sample_head says what it scales); 1.0 samples the
        model's own distribution.
        text [B, L] word ids (None: the null condition); guidance: the latent CFG strength alpha
        (None: conditional branch only). Only the head draws noise, one [B, D] draw per step, so a
        seed gives the same noises guided or not. on_frame(x): called with each new frame [B, D]."""
        self.check_sampling(steps, top_k)
        temperature = self.cfg.temperature if temperature is None else temperature
        B = prompt.shape[0] if prompt is not None else (1 if text is None else text.shape[0])
        device = next(self.parameters()).device
        state = self.new_state(B, device, text, guidance)
        x = None
        if prompt is not None:   # prefill frame by frame (the code path of sampling)
            for p in range(prompt.shape[1]):
                self.step_backbone(x, state)
                x = prompt[:, p]
        out = []
        for _ in range(n_frames):
            x = self.sample_head(self.step_backbone(x, state), steps, temperature, generator)
            out.append(x)
            if on_frame is not None:
                on_frame(x)
        return torch.stack(out, dim=1)

    # --- training and its report: what train.py needs from every LM ---
    def prepare(self, latents, seed=0, log=None):
        """Nothing to fit on the latents before training (rq.py's LMs fit their RVQ here)."""

    @torch.no_grad()
    def held_out(self, x):
        """Held-out scores on x [B, S, D], teacher-forced: the head's temperature-0 one-step
        prediction of every frame from the true past (the sCT loss does not show progress)."""
        z = self.conditioning(x, x)
        gen = torch.Generator(x.device).manual_seed(0)  # leaves the global RNG alone: resume exact
        pred = self.sample_head(z.flatten(0, 1), 1, 0.0, gen, around='noise').view_as(x)
        return {'val_mse': float(((pred - x) ** 2).mean()), 'val_var': float(x.var())}

    def describe(self):
        """One line for train.py's log."""
        cfg, first = self.cfg, ''
        if cfg.head_loss == 'consistency' and cfg.diffusion_steps:
            first = f' (TrigFlow loss for the first {cfg.diffusion_steps} steps)'
        text = f'n_text={cfg.n_text}, dropout {cfg.cond_dropout:g}' if cfg.n_text else 'off'
        return (f'{n_params(self) / 1e6:.2f}M params, head loss {cfg.head_loss}{first}, '
                f'M={cfg.head_batch_mul}, K={cfg.short_context}, noise aug {cfg.noise_aug}, '
                f'text {text}')


def pad_text(ids, n_text):
    """Lists of word ids -> LongTensor [B, L] padded with n_text (the null id)."""
    L = max([1] + [len(i) for i in ids])
    return torch.tensor([list(i) + [n_text] * (L - len(i)) for i in ids], dtype=torch.long)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == '__main__':   # parameter counts, and the toy's steps timed on random latents
    torch.manual_seed(0)
    with torch.device('meta'):   # shapes only: the paper's sizes cost no memory
        paper = CALM(PAPER)
    print(f'PAPER: {n_params(paper) / 1e6:.0f}M params, head {n_params(paper.head) / 1e6:.0f}M '
          '(never trained here)')
    m = CALM(TOY)
    x = torch.randn(32, TOY.context, TOY.latent_dim)   # the toy LM batch: 32 windows of 64 frames
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    print(f'TOY: {n_params(m) / 1e6:.2f}M params, head {n_params(m.head) / 1e6:.2f}M')
    models = {'consistency step(s)': m}
    # the toy's two phases, then a toy with an LSD head (built after them: their draws unchanged)
    for phase, first in (('TrigFlow', 0), ('sCT', TOY.diffusion_steps), ('LSD', 0)):
        if phase == 'LSD':
            m = models['flow-map jump(s)'] = CALM(replace(TOY, head_loss='lsd'))
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        best = math.inf
        for step in range(first, first + 3):
            t0 = time.time()
            loss, stats = m(x, step=step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            best = min(best, time.time() - t0)
        print(f'  {phase} training step: {best:.2f} s (best of 3, {torch.get_num_threads()} '
              f'threads); stats {stats}')
    for what, m in models.items():
        for steps in (1, 4):
            m.eval().generate(None, 10, steps=steps)   # warm-up
            t0 = time.time()
            m.generate(None, 100, steps=steps)
            print(f'  generation, {steps} {what}: {(time.time() - t0) * 10:.2f} ms/frame')
