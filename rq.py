"""
The discrete baselines CALM is compared against in the paper (its speech and music results), on the
same backbone. Read it after calm.py and train.py: the backbone, the text conditioning and the
latent CFG are calm.py's; what differs is what a frame is (Q codes) and how the head samples it.

    c_s = (c_s^1 .. c_s^Q) = RVQ(x_s)    Q codebooks of V codewords; x_s ~ sum_q e_q[c_s^q]
    z_s = T(sum_q Emb_q(c_{s-1}^q))      transformer.Transformer, the size of CALM's backbone
    RQ-Transformer:  c_s^k ~ softmax(W_k h_s^k / tau),
                     h_s^k = DepthT(Lin_k(z_s) + Emb'_k(c_s^{k-1}))_k,
                     Q sequential depth steps per frame (Lee et al. 2022, arXiv 2203.01941;
                     Moshi's "Depth Transformer", Défossez et al. 2024, arXiv 2410.00037 §3.4)
    delay pattern:   backbone step t reads and emits code q of frame t - q for every q at once:
                     one step, Q independent linear heads, no depth Transformer (MusicGen,
                     Copet et al. 2023, arXiv 2306.05284 §2.2)

RVQ (SoundStream, Zeghidour et al. 2021, arXiv 2107.03312 §3.3; EnCodec, Défossez et al. 2022,
arXiv 2210.13438 §3.2): level q quantises what the levels before it left over. Codebooks are learnt
as EnCodec and Mimi learn them: k-means initialisation, exponential moving averages (EMA) of the
vectors assigned to each codeword, dead codewords restarted on random inputs; the straight-through
estimator and commitment loss (RVQ.forward) are what a codec trains its encoder with. Here the RVQ
is FITTED ON THE FROZEN VAE's standardised latents (rq.fit, seconds): the discrete and continuous
models then share the VAE's decoder and only the language model differs. The paper instead trained
a separate RVQ codec (Mimi for speech, a 32-level VQ-VAE for music); that setting is here too:
vae.Config(bottleneck='rvq') trains the VAE with an RVQ in place of its Gaussian bottleneck, and
an LM on it takes the codec's codebooks (DiscreteLM.take_codebooks) instead of fitting its own.
Runs standalone: `python rq.py` prints parameter counts and a timing.
"""
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import calm
import transformer


@dataclass
class Config:
    kind: str = 'rq'            # 'rq' (RQ-Transformer: depth Transformer) or 'delay' (MusicGen)
    latent_dim: int = 16        # D, set from the VAE
    n_q: int = 8                # Q, RVQ levels (codes per frame)
    codebook_size: int = 256    # V, codewords per level: Q log2 V bits per frame
    d_model: int = 128          # backbone: calm.Config's fields and values (config_like)
    n_layers: int = 3
    n_heads: int = 4
    context: int = 64
    depth_d: int = 128          # depth Transformer (rq only); 3 x 128 with Q = 8, V = 256 has about
    depth_layers: int = 3       # the parameters of a 256 x 3 CALM head, the toy's until docs/toy.md
    # (its 128 x 2 head is 4.5x smaller, smaller than the codes' embeddings; `python rq.py`)
    depth_heads: int = 4
    temperature: float = 0.8    # default sampling temperature (Moshi samples audio codes at 0.8)
    top_k: int = 0              # 0: sample from all V codes
    dropout: float = 0.0
    n_text: int = 0             # text conditioning as calm.CALM.condition (0: unconditional)
    cond_dropout: float = 0.2
    # RVQ fit on the cached latents (fit): k-means init, then EMA steps
    rvq_init_frames: int = 16384  # frames the k-means initialisation clusters
    rvq_kmeans_iters: int = 30
    rvq_steps: int = 200        # EMA steps of rvq_batch frames (~4 passes over the toy's frames)
    rvq_batch: int = 8192
    rvq_decay: float = 0.99     # EMA decay (EnCodec, Mimi)
    rvq_dead: float = 0.1       # restart a codeword used under this x the mean usage (Mimi)


# --preset paper: Moshi's depth Transformer (6 layers, d 1024, 16 heads) and the paper's music codec
# (32 levels; 8.8 kbps at 25 Hz is 11 bits per code, V = 2048). Never trained here.
PAPER_DEPTH = dict(n_q=32, codebook_size=2048, depth_d=1024, depth_layers=6, depth_heads=16)


def config_like(calm_cfg, **kw):
    """A discrete-LM config with calm_cfg's backbone (d_model, layers, heads, context, text)."""
    same = {k: getattr(calm_cfg, k) for k in ('latent_dim', 'd_model', 'n_layers', 'n_heads',
                                              'context', 'dropout', 'n_text', 'cond_dropout')}
    return Config(**{**same, **kw})


def check(cfg, n_frames=None):
    """One-line errors for a config that cannot work (ValueError). n_frames: the latent frames the
    RVQ is fitted on."""
    V = cfg.codebook_size
    if cfg.kind not in ('rq', 'delay'):
        raise ValueError(f"kind must be 'rq' or 'delay', got {cfg.kind!r}")
    if cfg.n_q < 1 or V < 2:
        raise ValueError(f'need Q >= 1 levels and V >= 2 codewords, got Q = {cfg.n_q}, V = {V}')
    if cfg.kind == 'delay' and cfg.n_q > cfg.context:
        raise ValueError(f'the delay pattern needs Q <= context ({cfg.n_q} > {cfg.context})')
    if cfg.kind == 'rq' and cfg.depth_d % cfg.depth_heads:
        raise ValueError(f'depth_d {cfg.depth_d} is not a multiple of depth_heads '
                         f'{cfg.depth_heads}')
    # before the model is built: a V that does not fit may also be too large to allocate
    if min(n_frames or cfg.rvq_init_frames, cfg.rvq_init_frames) < V:
        frames = '' if n_frames is None else f'{n_frames} latent frames, '
        raise ValueError(f'V = {V} codewords do not fit: k-means starts from V distinct frames and '
                         f'has min({frames}rvq_init_frames {cfg.rvq_init_frames})')


# --------------------------------------------------------------------------------------------------
# Residual vector quantisation

def nearest(x, codebook):
    """Index of the nearest codeword (Euclidean) for each row of x [N, D]; codebook [V, D]. |x|^2 is
    the same for every codeword, so argmin |c|^2 - 2 x.c (one fused matmul) is the nearest."""
    return torch.addmm((codebook * codebook).sum(1), x, codebook.T, alpha=-2).argmin(1)


def kmeans(x, V, iters, rng):
    """Lloyd's k-means on x [N, D] from V distinct random rows (an empty cluster takes a random
    row). Returns (centroids [V, D], counts [V])."""
    c = x[torch.from_numpy(rng.choice(len(x), V, replace=False))].clone()
    for _ in range(iters):
        idx = nearest(x, c)
        counts = torch.bincount(idx, minlength=V).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        spare = x[torch.from_numpy(rng.integers(len(x), size=V))]
        c = torch.where((counts == 0)[:, None], spare, sums / counts.clamp_min(1)[:, None])
    return c, torch.bincount(nearest(x, c), minlength=V).to(x.dtype)


class RVQ(nn.Module):
    """Q codebooks [Q, V, D] (buffers: learnt by EMA, not by gradient), with the EMA statistics
    cluster_size [Q, V] (assigned vectors per step) and embed_sum [Q, V, D] (their sum)."""

    def __init__(self, dim, n_q, V, decay=0.99, dead=0.1):
        super().__init__()
        self.n_q, self.V, self.decay, self.dead = n_q, V, decay, dead
        self.restarts = 0   # dead codewords restarted so far (a log, not state)
        self.register_buffer('codebooks', torch.zeros(n_q, V, dim))
        self.register_buffer('cluster_size', torch.zeros(n_q, V))
        self.register_buffer('embed_sum', torch.zeros(n_q, V, dim))

    @torch.no_grad()
    def encode(self, x):
        """x [..., D] -> codes [..., Q] (long): level q takes the codeword nearest to the residual.
        """
        with torch.autocast(x.device.type, enabled=False):
            r, codes = x.reshape(-1, x.shape[-1]).float(), []
            for q in range(self.n_q):
                idx = nearest(r, self.codebooks[q])
                r = r - self.codebooks[q][idx]
                codes.append(idx)
        return torch.stack(codes, -1).view(*x.shape[:-1], self.n_q)

    def decode(self, codes):
        """codes [..., Q'] (the first Q' <= Q levels) -> the sum of their codewords [..., D]."""
        return sum(self.codebooks[q][codes[..., q]] for q in range(codes.shape[-1]))

    @torch.no_grad()
    def init_level(self, q, r, rng, iters):
        """k-means initialisation of level q on its residuals r [N, D] (EnCodec: first batch)."""
        c, counts = kmeans(r, self.V, iters, rng)
        self.codebooks[q], self.cluster_size[q], self.embed_sum[q] = c, counts, c * counts[:, None]

    @torch.no_grad()
    def ema_update(self, q, r, idx, rng):
        """One EMA step of level q on residuals r [N, D] assigned to idx [N]: usage and sums decay,
        the codeword becomes sum / usage (Laplace-smoothed: a rarely used codeword stays finite). A
        codeword whose usage falls under `dead` x the mean usage is restarted on a random residual
        of this batch (EnCodec/Mimi), with the mean usage, so it competes at once."""
        onehot_counts = torch.bincount(idx, minlength=self.V).to(r.dtype)
        sums = torch.zeros_like(self.embed_sum[q]).index_add_(0, idx, r)
        self.cluster_size[q].mul_(self.decay).add_(onehot_counts, alpha=1 - self.decay)
        self.embed_sum[q].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n, eps = self.cluster_size[q].sum(), 1e-5
        usage = (self.cluster_size[q] + eps) / (n + self.V * eps) * n
        self.codebooks[q] = self.embed_sum[q] / usage[:, None]
        mean = n / self.V
        dead = self.cluster_size[q] < self.dead * mean
        if dead.any():
            pick = r[torch.from_numpy(rng.integers(len(r), size=int(dead.sum())))]
            self.codebooks[q][dead] = pick
            self.cluster_size[q][dead] = mean
            self.embed_sum[q][dead] = pick * mean
            self.restarts += int(dead.sum())

    def forward(self, x, rngs=None):
        """Quantise x [..., D] as a codec does while training its encoder. Returns (x_q, codes,
        commit): x_q = x + sg(q(x) - x), the straight-through estimator (the gradient reaches x
        unchanged); commit = mean over levels of ||r_q - sg(e_q)||^2, the commitment loss (EnCodec,
        weight 1). In training mode each level first takes an EMA step on its residuals (rngs[q]:
        numpy Generators for the dead-code restarts, one per level)."""
        r = x.reshape(-1, x.shape[-1])
        out, codes, commit = torch.zeros_like(r), [], 0.0
        for q in range(self.n_q):
            idx = nearest(r.detach(), self.codebooks[q])
            e = self.codebooks[q][idx]              # the codebook before its update (EnCodec)
            if self.training:
                self.ema_update(q, r.detach(), idx, rngs[q])
            commit = commit + F.mse_loss(r, e.detach()) / self.n_q
            out, r = out + e, r - e
            codes.append(idx)
        x_q = out.view_as(x)
        return x + (x_q - x).detach(), torch.stack(codes, -1).view(*x.shape[:-1], self.n_q), commit


def code_stats(codes, V):
    """Per level: the fraction of the V codewords used, the code histogram's entropy in bits."""
    out = []
    for q in range(codes.shape[-1]):
        p = torch.bincount(codes[..., q].flatten(), minlength=V).double()
        p = p[p > 0] / p.sum()
        out.append({'usage': len(p) / V, 'entropy_bits': float(-(p * p.log2()).sum())})
    return out


@torch.no_grad()
def fit(rvq, latents, cfg, seed=0, log=print):
    """Fit rvq on latents [N, D]: k-means init of each level on rvq_init_frames frames, then
    rvq_steps EMA steps on random batches. Deterministic given seed; each level draws from its own
    generator, so a Q-level fit equals the first Q levels of any deeper fit (levels never look at
    the levels after them). The EMA steps are RVQ.forward in training mode: a codec's training loop,
    with the encoder frozen. Returns per-level stats on the fitted frames: code usage, entropy, mean
    squared residual."""
    x = latents.reshape(-1, latents.shape[-1]).float()
    data_rng = np.random.default_rng([seed, 0])
    rngs = [np.random.default_rng([seed, 1, q]) for q in range(rvq.n_q)]
    t0 = time.time()
    pick = data_rng.choice(len(x), min(len(x), cfg.rvq_init_frames), replace=False)
    r = x[torch.from_numpy(pick)]
    for q in range(rvq.n_q):
        rvq.init_level(q, r, rngs[q], cfg.rvq_kmeans_iters)
        r = r - rvq.codebooks[q][nearest(r, rvq.codebooks[q])]
    scale = cfg.rvq_batch / max(1, len(r))  # usage counted per batch of rvq_batch frames from here
    rvq.cluster_size.mul_(scale)
    rvq.embed_sum.mul_(scale)
    rvq.train()
    for step in range(cfg.rvq_steps):
        rvq(x[torch.from_numpy(data_rng.integers(len(x), size=cfg.rvq_batch))], rngs)
        if log and ((step + 1) % 50 == 0 or step + 1 == cfg.rvq_steps):
            rate = (step + 1) / (time.time() - t0)
            log(f'rvq {step + 1}/{cfg.rvq_steps} EMA steps | {rate:.1f} steps/s | {rvq.restarts} '
                'restarts so far')
    rvq.eval()
    pick = data_rng.choice(len(x), min(len(x), 65536), replace=False)
    return rvq_report(rvq, x[torch.from_numpy(pick)])


def fit_summary(stats, seconds):
    """One line on a fit: per-level entropy, the residual left after the first and the last level.
    """
    entropy = ' '.join(f"{s['entropy_bits']:.2f}" for s in stats)
    return (f'rvq: Q={len(stats)} levels fitted in {seconds:.1f} s | entropy per level (bits) '
            f"{entropy} | residual MSE {stats[0]['residual_mse']:.3f} -> "
            f"{stats[-1]['residual_mse']:.4f} after Q levels (latent variance 1)")


@torch.no_grad()
def rvq_report(rvq, x):
    """Per level, on frames x: code usage, entropy and the mean squared residual left after it."""
    codes = rvq.encode(x)
    stats = code_stats(codes, rvq.V)
    for q in range(rvq.n_q):
        stats[q]['residual_mse'] = float(((x - rvq.decode(codes[:, :q + 1])) ** 2).mean())
    return stats


# --------------------------------------------------------------------------------------------------
# Language models on the codes

class CodeEmbedding(nn.Module):
    """A frame's backbone input: the sum of its Q codes' embeddings, one table per level (Moshi
    §3.4). n_codes = V, or V + 1 for the delay LM, whose id V means 'no code here' (before a
    level's first frame)."""

    def __init__(self, n_q, n_codes, d):
        super().__init__()
        self.emb = nn.Embedding(n_q * n_codes, d)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.register_buffer('offset', torch.arange(n_q) * n_codes, persistent=False)

    def forward(self, codes):
        """codes [..., Q] -> [..., d]."""
        return self.emb(codes + self.offset).sum(-2)


def old_depth_block_keys(module, state_dict, prefix, *args):
    """Checkpoints from before the depth Transformer was made of transformer.Block kept each
    block's qkv and proj at its top level: move them under attn. (a load_state_dict pre-hook)."""
    for name in [k for k in state_dict if k.startswith((prefix + 'qkv.', prefix + 'proj.'))]:
        state_dict[prefix + 'attn.' + name[len(prefix):]] = state_dict.pop(name)


class DepthTransformer(nn.Module):
    """Moshi's depth Transformer (§3.4): for one frame, step k = 0..Q-1 reads Lin_k(z_s) plus the
    embedding of code k-1 (step 0 the projection alone), attends causally to steps < k, and outputs
    the logits of level k with its own linear layer. Teacher-forced training is one pass over the Q
    levels of every frame at once ([B*S, Q, d])."""

    def __init__(self, d_in, n_q, V, d, n_layers, n_heads, dropout=0.0):
        super().__init__()
        self.n_q, self.V, self.d, self.n_heads = n_q, V, d, n_heads
        self.proj = nn.ModuleList([nn.Linear(d_in, d) for _ in range(n_q)])
        self.emb = nn.Embedding(max(n_q - 1, 0) * V, d)
        nn.init.normal_(self.emb.weight, std=0.02)
        # transformer.Block without rotary embedding: every level has its own input projection,
        # so positions need no encoding (Moshi §3.4); a ring-buffer cache of Q slots holds levels
        self.blocks = nn.ModuleList([transformer.Block(d, n_heads, n_q, dropout, rope=False)
                                     for _ in range(n_layers)])
        for blk in self.blocks:
            blk.register_load_state_dict_pre_hook(old_depth_block_keys)
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.ModuleList([nn.Linear(d, V) for _ in range(n_q)])

    def forward(self, z, codes):
        """z [N, d_in], codes [N, Q] (teacher forcing) -> logits [N, Q, V]; level k sees codes < k.
        """
        h = torch.stack([p(z) for p in self.proj], 1)
        if self.n_q > 1:
            prev = self.emb(codes[:, :-1] + torch.arange(self.n_q - 1, device=z.device) * self.V)
            h = h + F.pad(prev, (0, 0, 1, 0))
        for blk in self.blocks:
            h = blk(h)
        h = self.ln_f(h)
        return torch.stack([o(h[:, k]) for k, o in enumerate(self.out)], 1)

    def new_cache(self, N, device=None):
        sh = (N, self.n_heads, self.n_q, self.d // self.n_heads)
        return [(torch.zeros(sh, device=device), torch.zeros(sh, device=device))
                for _ in self.blocks]

    def step(self, z, code_prev, k, cache):
        """Level k's logits [N, V] from z [N, d_in] and code k-1 [N] (None for k = 0); KV cached."""
        h = self.proj[k](z)
        if k > 0:
            h = h + self.emb(code_prev + (k - 1) * self.V)
        h = h[:, None]
        for blk, kv in zip(self.blocks, cache):
            h = blk.step(h, k, kv)
        return self.out[k](self.ln_f(h[:, 0]))


def sample_logits(logits, temperature=1.0, top_k=0, generator=None):
    """Codes [...] from logits [..., V]: softmax(logits / temperature), optionally restricted to the
    top_k codes; temperature 0 takes the argmax. top_k keeps exactly k codes, the indices topk
    returns (a threshold at the k-th logit would also keep every code tied with it)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        logits, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
        pick = torch.multinomial(probs, 1, generator=generator)
        return idx.reshape(-1, idx.shape[-1]).gather(1, pick).view(logits.shape[:-1])
    probs = logits.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def delay(codes, pad):
    """MusicGen's delay pattern: codes [B, S, Q] -> [B, S + Q - 1, Q] where step t holds code q of
    frame t - q (pad where there is none): one step emits one code of every level, level q lagging
    q frames."""
    B, S, Q = codes.shape
    out = codes.new_full((B, S + Q - 1, Q), pad)
    for q in range(Q):
        out[:, q:q + S, q] = codes[:, :, q]
    return out


def undelay(d):
    """The inverse of delay: [B, T, Q] -> [B, T - Q + 1, Q], the frames with every level present."""
    Q = d.shape[-1]
    S = d.shape[1] - Q + 1
    return torch.stack([d[:, q:q + S, q] for q in range(Q)], -1)


class DiscreteLM(nn.Module):
    """What the RQ-Transformer and the delay LM share: the fitted RVQ, the backbone
    (transformer.Transformer fed summed code embeddings), text conditioning and latent CFG exactly
    as calm.CALM's, and calm.CALM's interface (pipeline.KINDS): forward, held_out, generate,
    new_state / step_backbone / sample_head."""
    multistep = False   # one code per level per frame: no head steps to choose

    def __init__(self, cfg: Config, n_codes):
        super().__init__()
        check(cfg)
        self.cfg = cfg
        Q, V = cfg.n_q, cfg.codebook_size
        self.rvq = RVQ(cfg.latent_dim, Q, V, cfg.rvq_decay, cfg.rvq_dead)
        self.backbone = transformer.Transformer(cfg.latent_dim, cfg.d_model, cfg.n_heads,
                                         [cfg.context] * cfg.n_layers, cfg.dropout,
                                         inp=CodeEmbedding(Q, n_codes, cfg.d_model))
        self.text = (nn.Embedding(cfg.n_text + 1, cfg.d_model, padding_idx=cfg.n_text)
                     if cfg.n_text > 0 else None)
        if self.text is not None:
            nn.init.normal_(self.text.weight[:cfg.n_text], std=0.02)

    # text [B, L] -> c [B, d]: summed word embeddings, condition dropout
    condition = calm.CALM.condition

    def prepare(self, latents, seed=0, log=None):
        """Fit the RVQ on the run's cached latents (corpus.LatentCache) before the LM trains, as
        train.py does; log(record, line) as runs.Log. Deterministic, so every DDP rank fits the
        same codebooks."""
        frames = latents.frames()
        check(self.cfg, len(frames))
        t0 = time.time()
        printer = print if log is not None and log.enabled else None
        stats = fit(self.rvq, frames, self.cfg, seed, log=printer)
        if log is not None:
            seconds = time.time() - t0
            log({'stage': 'rvq', 'seconds': seconds, 'levels': stats}, fit_summary(stats, seconds))

    @torch.no_grad()
    def take_codebooks(self, codec_rvq, log=None):
        """Use the first Q levels of an RVQ codec trained end to end (vae.Config.bottleneck =
        'rvq') instead of fitting an RVQ on the latents: its latents are the codec's encoder
        vectors, so self.rvq.encode gives exactly the codes the codec's decoder was trained on
        (a level never looks at the levels after it)."""
        Q, V = self.cfg.n_q, self.cfg.codebook_size
        if Q > codec_rvq.n_q or V != codec_rvq.V:
            raise ValueError(f'the codec has {codec_rvq.n_q} levels of {codec_rvq.V} codewords; '
                             f'this LM wants {Q} of {V}')
        self.rvq.codebooks.copy_(codec_rvq.codebooks[:Q])
        if log is not None:
            log({'stage': 'rvq', 'from_codec': True, 'levels': Q, 'codebook_size': V},
                f"rvq: the VAE's RVQ codec, its first {Q} of {codec_rvq.n_q} levels x {V} "
                'codewords')

    def describe(self):
        """One line for train.py's log."""
        cfg, n = self.cfg, lambda m: f'{calm.n_params(m) / 1e6:.2f}M'
        part = 'depth Transformer' if cfg.kind == 'rq' else 'linear heads'
        return (f'{cfg.kind}, {n(self)} params (backbone {n(self.backbone)}, {part} '
                f'{n(self.head)}), Q={cfg.n_q} x V={cfg.codebook_size} codes per frame '
                f'({cfg.n_q * math.log2(cfg.codebook_size):g} bits), '
                f'text {"on" if cfg.n_text else "off"}')

    def new_state(self, B, device=None, text=None, guidance=None):
        state = {'long': self.backbone.new_cache(B, device), 'c': None, 'alpha': None}
        if text is not None:
            state['c'] = self.condition(text.to(device))
            if guidance is not None:
                state['alpha'], state['long_null'] = guidance, self.backbone.new_cache(B, device)
        return state

    @torch.no_grad()
    def step_backbone(self, codes_prev, state):
        """codes_prev [B, Q] (None at the start) -> z [B, d]; latent CFG as
        calm.CALM.step_backbone."""
        z = self.backbone.step(codes_prev, state['long'], state['c'])
        if state['alpha'] is not None:
            z = torch.lerp(self.backbone.step(codes_prev, state['long_null']), z, state['alpha'])
        return z

    def check_sampling(self, steps=1, top_k=None):
        """One-line errors for sampling options this LM does not take."""
        if steps != 1:
            raise ValueError(f'steps = {steps}: head steps per frame are a CALM option; a discrete '
                             'LM samples each code once')

    @torch.inference_mode()
    def generate(self, prompt=None, n_frames=100, steps=1, temperature=None, generator=None,
                 text=None, guidance=None, top_k=None, on_frame=None):
        """prompt [B, P, D] latents or None -> [B, n_frames, D]: the new frames' codes
        (generate_codes: the prompt is quantised and fed frame by frame, then codes are sampled
        frame by frame with the KV caches), dequantised to latents for the VAE decoder. The
        signature of calm.CALM.generate; steps must be 1. temperature / top_k: None = the config's
        (0.8, all codes). on_frame(x): called with each new frame [B, D] once all its codes are
        sampled."""
        self.check_sampling(steps, top_k)
        B = prompt.shape[0] if prompt is not None else (1 if text is None else text.shape[0])
        device = next(self.parameters()).device
        codes = self.generate_codes(None if prompt is None else self.rvq.encode(prompt), n_frames,
                                    self.cfg.temperature if temperature is None else temperature,
                                    self.cfg.top_k if top_k is None else top_k, generator,
                                    self.new_state(B, device, text, guidance),
                                    on_frame and (lambda c: on_frame(self.rvq.decode(c))))
        return self.rvq.decode(codes)


class RQTransformer(DiscreteLM):
    kind = 'rq'

    def __init__(self, cfg: Config):
        super().__init__(cfg, cfg.codebook_size)
        self.depth = DepthTransformer(cfg.d_model, cfg.n_q, cfg.codebook_size, cfg.depth_d,
                                      cfg.depth_layers, cfg.depth_heads, cfg.dropout)

    @property
    def head(self):
        """What samples a frame's codes from z_s (CALM's head)."""
        return self.depth

    def logits(self, codes, c=None):
        """codes [B, S, Q] -> logits [B, S, Q, V] of every code, teacher-forced: frame s sees frames
        < s through the backbone and its own codes < k through the depth Transformer."""
        z = self.backbone(codes, c)
        return self.depth(z.flatten(0, 1), codes.flatten(0, 1)).view(*codes.shape, -1)

    def forward(self, x, step=0, text=None):
        """x [B, S, D] standardised latents -> (loss, stats): cross-entropy over all codes (equal
        level weights)."""
        c = self.condition(text) if text is not None else None
        codes = self.rvq.encode(x)
        logits = self.logits(codes, c)
        ce = F.cross_entropy(logits.flatten(0, 2).float(), codes.flatten(), reduction='none')
        ce = ce.view(codes.shape)
        loss = ce.mean()
        per_level = ce.mean((0, 1))
        return loss, {'loss': loss.item(), 'ce_first': per_level[0].item(),
                      'ce_last': per_level[-1].item()}

    @torch.no_grad()
    def sample_head(self, z, steps=1, temperature=0.8, generator=None, top_k=0):
        """z [N, d] -> codes [N, Q]: Q depth steps, each sampled and fed back (KV cache over the
        levels). steps: the interface's; a code is sampled once."""
        cache, code, codes = self.depth.new_cache(z.shape[0], z.device), None, []
        for k in range(self.cfg.n_q):
            code = sample_logits(self.depth.step(z, code, k, cache), temperature, top_k, generator)
            codes.append(code)
        return torch.stack(codes, -1)

    @torch.inference_mode()
    def generate_codes(self, prompt_codes, n_frames, temperature, top_k, generator, state,
                       on_frame=None):
        """prompt_codes [B, P, Q] or None -> codes [B, n_frames, Q]: one backbone step per frame,
        then the frame's Q codes from the depth Transformer (on_frame(codes [B, Q]) after each)."""
        prev = None
        if prompt_codes is not None:
            for p_codes in prompt_codes.unbind(1):
                self.step_backbone(prev, state)
                prev = p_codes
        out = []
        for _ in range(n_frames):
            z = self.step_backbone(prev, state)
            prev = self.sample_head(z, temperature=temperature, generator=generator, top_k=top_k)
            out.append(prev)
            if on_frame is not None:
                on_frame(prev)
        return torch.stack(out, 1)

    @torch.no_grad()
    def held_out(self, x):
        """Teacher-forced held-out scores on x [B, S, D]: mean cross-entropy, and the MSE of the
        argmax codes' frame (temperature 0, level by level) against x, comparable with CALM's
        val_mse (pipeline.validation's val_next_mse computes the same quantity through generate)."""
        codes = self.rvq.encode(x)
        z = self.backbone(codes)
        logits = self.depth(z.flatten(0, 1), codes.flatten(0, 1))
        ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        pred = self.rvq.decode(self.sample_head(z.flatten(0, 1), temperature=0.0)).view_as(x)
        return {'val_ce': float(ce), 'val_mse': float(((pred - x) ** 2).mean()),
                'val_var': float(x.var())}


class DelayLM(DiscreteLM):
    kind = 'delay'

    def __init__(self, cfg: Config):
        super().__init__(cfg, cfg.codebook_size + 1)   # + the 'no code' id V
        # Q independent linear heads
        self.heads = nn.Linear(cfg.d_model, cfg.n_q * cfg.codebook_size)

    @property
    def head(self):
        """What samples a frame's codes from z_s (CALM's head)."""
        return self.heads

    def logits(self, delayed, c=None):
        """delayed codes [B, T, Q] -> logits [B, T, Q, V]: step t predicts row t of the delay
        pattern."""
        z = self.backbone(delayed, c)
        return self.heads(z).view(*delayed.shape, self.cfg.codebook_size)

    def forward(self, x, step=0, text=None):
        c = self.condition(text) if text is not None else None
        V = self.cfg.codebook_size
        d = delay(self.rvq.encode(x), V)[:, :x.shape[1]]   # the window's first S steps
        ce = F.cross_entropy(self.logits(d, c).flatten(0, 2).float(), d.flatten(), ignore_index=V)
        return ce, {'loss': ce.item()}

    @torch.no_grad()
    def sample_head(self, z, steps=1, temperature=0.8, generator=None, top_k=0):
        """z [N, d] -> one code per level [N, Q] (level q belongs to frame t - q)."""
        logits = self.heads(z).view(z.shape[0], self.cfg.n_q, -1)
        return sample_logits(logits, temperature, top_k, generator)

    @torch.inference_mode()
    def generate_codes(self, prompt_codes, n_frames, temperature, top_k, generator, state,
                       on_frame=None):
        """prompt_codes [B, P, Q] or None -> codes [B, n_frames, Q] in n_frames + Q - 1 backbone
        steps (P more with a prompt): at step t level q belongs to frame t - q; codes of prompt
        frames are forced, later ones sampled (also those of frames past the end, which are then
        dropped: the model never saw its 'no code' id at the end of a sequence). on_frame(codes
        [B, Q]): called with each new frame at the step that samples its last level."""
        Q, V = self.cfg.n_q, self.cfg.codebook_size
        B, device = state['long']['kv'][0][0].shape[0], state['long']['kv'][0][0].device
        P = 0 if prompt_codes is None else prompt_codes.shape[1]
        known = torch.full((B, P + n_frames, Q), V, dtype=torch.long, device=device)
        if P:
            known[:, :P] = prompt_codes
        known = delay(known, V)                                         # [B, P + n + Q - 1, Q]
        frame = (torch.arange(known.shape[1], device=device)[:, None]
                 - torch.arange(Q, device=device))
        prev, rows = None, []
        for t in range(known.shape[1]):
            z = self.step_backbone(prev, state)
            row = known[:, t]
            if t >= P:          # levels whose frame t - q is new are sampled
                new = self.sample_head(z, temperature=temperature, generator=generator, top_k=top_k)
                row = torch.where(frame[t] >= P, new, row)
            rows.append(row)
            prev = row
            f = t - Q + 1             # the frame whose last level this step holds
            if on_frame is not None and f >= P:
                on_frame(torch.stack([rows[f + q][:, q] for q in range(Q)], -1))
        return undelay(torch.stack(rows, 1))[:, P:]

    @torch.no_grad()
    def held_out(self, x):
        V, S = self.cfg.codebook_size, x.shape[1]
        d = delay(self.rvq.encode(x), V)[:, :S]
        logits = self.logits(d)
        ce = F.cross_entropy(logits.flatten(0, 2), d.flatten(), ignore_index=V)
        # frames 0..S-Q, each level from its own step: level q given the TRUE levels < q of its
        # frame (teacher forcing), so not CALM's measure (pipeline.validation's val_next_mse is)
        pred = undelay(logits.argmax(-1))
        mse = ((self.rvq.decode(pred) - x[:, :pred.shape[1]]) ** 2).mean()
        return {'val_ce': float(ce), 'val_mse_true_lower': float(mse), 'val_var': float(x.var())}


def build(cfg: Config):
    """The discrete LM cfg.kind names."""
    return (RQTransformer if cfg.kind == 'rq' else DelayLM)(cfg)


if __name__ == '__main__':   # parameter counts vs CALM's head; training s/step at the toy batch
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    c = calm.CALM(calm.TOY)
    models = {'calm': c, **{k: build(config_like(calm.TOY, kind=k)) for k in ('rq', 'delay')}}
    print(f'calm.TOY: {calm.n_params(c) / 1e6:.3f}M params, head '
          f'{calm.n_params(c.head) / 1e6:.3f}M')
    for kind in ('rq', 'delay'):
        print(models[kind].describe())
        models[kind].rvq.codebooks.normal_()
    x = torch.randn(32, calm.TOY.context, calm.TOY.latent_dim)  # the toy LM batch: 32 x 64 frames
    # step 10**6: past the toy's TrigFlow phase, so the sCT loss
    jobs = {'calm TrigFlow step': lambda: c(x, step=0), 'calm sCT step': lambda: c(x, step=10 ** 6),
            'rq': lambda: models['rq'](x), 'delay': lambda: models['delay'](x)}
    best = {}
    for _ in range(3):   # interleaved, best of 3: a shared machine slows them alike
        for name, fn in jobs.items():
            t0 = time.time()
            fn()[0].backward()
            best[name] = min(best.get(name, math.inf), time.time() - t0)
    ref = best['calm TrigFlow step']
    print(f'training forward + backward, s/step ({torch.get_num_threads()} threads): '
          + ', '.join(f'{k} {v:.2f} ({v / ref:.2f}x)' for k, v in best.items()))
