"""
The one Transformer of calm: CALM's backbone T_long and short-context T_short (calm.py), the VAE's
bottleneck (vae.py) and the discrete LMs (rq.py) are made of it. Causal self-attention with rotary
positions (RoPE) and a ring-buffer KV cache: rotary positions make attention depend on distances
only, so the cache rolls past the context at a flat per-frame cost; T_short is the same module with
a window of K frames.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def rope(x, pos, inv_freq):
    """Rotary embedding of x [B, H, S, hd] at integer positions pos [S]."""
    ang = pos[:, None].float() * inv_freq[None, :]              # [S, hd/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal self-attention over the last `window` positions. rope=False: no positions at all
    (rq.py's depth Transformer, whose every step has its own input projection)."""
    def __init__(self, d, n_heads, window, rope=True):
        super().__init__()
        self.h, self.hd, self.window = n_heads, d // n_heads, window
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd)
        self.register_buffer('inv_freq', inv_freq if rope else None, persistent=False)

    def split(self, h, pos):
        B, S, _ = h.shape
        q, k, v = self.qkv(h).view(B, S, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        if self.inv_freq is None:
            return q, k, v
        return rope(q, pos, self.inv_freq), rope(k, pos, self.inv_freq), v

    def forward(self, h):
        B, S, d = h.shape
        q, k, v = self.split(h, torch.arange(S, device=h.device))
        if S <= self.window:   # plain causal attention is the same as windowed attention here
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:                  # position s sees s-window+1..s: what the rolling cache sees
            i = torch.arange(S, device=h.device)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        return self.proj(y.transpose(1, 2).reshape(B, S, d))

    def step(self, h, pos, cache):
        """One new token h [B, 1, d] at position pos; cache = (k [B,H,W,hd], v) ring buffers: slot
        pos % W is overwritten, no shifting (softmax attention does not see the slots' order)."""
        B = h.shape[0]
        q, k, v = self.split(h, torch.tensor([pos], device=h.device))
        ck, cv = cache
        slot = pos % self.window
        ck[:, :, slot] = k[:, :, 0]
        cv[:, :, slot] = v[:, :, 0]
        n = min(pos + 1, self.window)
        y = F.scaled_dot_product_attention(q, ck[:, :, :n], cv[:, :, :n])
        return self.proj(y.transpose(1, 2).reshape(B, 1, -1))


class Block(nn.Module):
    """Pre-norm Transformer block."""
    def __init__(self, d, n_heads, window, dropout=0.0, rope=True):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, n_heads, window, rope)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))

    def step(self, h, pos, cache):
        h = h + self.attn.step(self.ln1(h), pos, cache)
        return h + self.mlp(self.ln2(h))


class Transformer(nn.Module):
    """Causal Transformer over frames; position s reads Linear(x_{s-1}) (a learned start frame at
    s=1) and outputs the conditioning for x_s (paper Eq. 3). windows[l]: the positions layer l
    attends to. inp: the input module in place of Linear(D, d) (rq.py: summed code embeddings)."""
    def __init__(self, D, d, n_heads, windows, dropout=0.0, inp=None):
        super().__init__()
        self.d, self.n_heads = d, n_heads
        self.inp = nn.Linear(D, d) if inp is None else inp
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, n_heads, w, dropout) for w in windows])
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x, c=None):
        """x [B, S, D] -> z [B, S, d]; z[:, s] depends on x[:, :s] only (x is shifted right by one).
        c [B, d] (optional): a condition added to every input position, start frame included."""
        B = x.shape[0]
        h = torch.cat([self.start.expand(B, 1, -1), self.inp(x[:, :-1])], dim=1)
        if c is not None:
            h = h + c[:, None]
        for blk in self.blocks:
            h = blk(h)
        return self.ln_f(h)

    def new_cache(self, B, device=None):
        shapes = [(B, self.n_heads, blk.attn.window, self.d // self.n_heads) for blk in self.blocks]
        return {'pos': 0, 'kv': [(torch.zeros(sh, device=device), torch.zeros(sh, device=device))
                                 for sh in shapes]}

    def step(self, x_prev, cache, c=None):
        """x_prev [B, D] (the previous frame) or None at the start -> z [B, d]; one new token."""
        B = cache['kv'][0][0].shape[0]
        h = (self.start.expand(B, -1) if x_prev is None else self.inp(x_prev))[:, None]
        if c is not None:
            h = h + c[:, None]
        for blk, kv in zip(self.blocks, cache['kv']):
            h = blk.step(h, cache['pos'], kv)
        cache['pos'] += 1
        return self.ln_f(h[:, 0])
