"""Every kind of LM learns a made sequence with a known answer, through train.train (the loop the
toy trains with), then generate reproduces the answer greedily and held_out scores it: forward
trains toward the targets that generate samples, or these fail. The sequence cycles through P
frames from a random phase, so the next frame is a function of the past that a model must read
from its inputs (the first frame of a window, with no past, is the only one it cannot know)."""
import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calm  # noqa: E402
import rq  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
P, S, B = 4, 12, 16          # cycle length, window frames, windows per batch


def windows(frames, step):
    """Batch `step` (a pure function of it, as train.train requires): B windows of S frames of the
    cycle, each from its own random phase."""
    phase = torch.randint(len(frames), (B, 1), generator=torch.Generator().manual_seed(step))
    return frames[(phase + torch.arange(S)) % len(frames)]


def fit(model, steps, lr):
    """train.train on the cycle, nothing written; returns the last step's and held-out stats."""
    args = argparse.Namespace(device='cpu', resume=False, compile=False, log_every=10 ** 9,
                              ckpt_every=10 ** 9, minutes=None, stop_after=None)
    recipe = dict(steps=steps, batch=B, lr=lr, warmup=20, wd=0.0, sct_lr=1.0)
    val = windows(model.frames, 10 ** 6)
    finished, stats = train.train('lm', model, model.cfg, recipe,
                                  lambda s: windows(model.frames, s), os.devnull, args, False,
                                  runs.Log(os.devnull, False),
                                  validate=lambda: model.held_out(val))
    assert finished
    return stats


def continues_the_cycle(model, n_prompt=3):
    """Greedy continuation of a prompt of the cycle: (the generated frames, the true ones)."""
    frames = model.frames
    index = torch.arange(n_prompt + 2 * P) % P
    prompt, answer = frames[index[:n_prompt]][None], frames[index[n_prompt:]][None]
    with torch.no_grad():
        return model.generate(prompt, 2 * P, steps=1, temperature=0.0), answer


def first_frame_bound(frames, n_scored):
    """The held-out MSE of a model that gets every frame right but the first of each window (which
    no model can know): at most the largest mean squared distance of two frames, over n_scored."""
    return float(((frames[:, None] - frames[None]) ** 2).mean(-1).max()) / n_scored


def tiny_calm(objective):
    cfg = calm.Config(latent_dim=4, d_model=32, n_layers=2, n_heads=2, context=S, short_context=3,
                      short_layers=1, head_width=32, head_blocks=2, head_batch_mul=2,
                      head_loss=objective, tangent_warmup=100)
    return calm.CALM(cfg)


def tiny_discrete(kind):
    """An RQ-Transformer or delay LM whose RVQ is set by hand: level q's codewords are +-e_i / 4^q,
    so every sum of one codeword per level decodes back to its codes exactly (no fit needed)."""
    cfg = rq.Config(kind=kind, latent_dim=4, n_q=3, codebook_size=8, d_model=32, n_layers=2,
                    n_heads=2, context=S, depth_d=16, depth_layers=2, depth_heads=2)
    m = rq.build(cfg)
    eye = torch.eye(4)
    with torch.no_grad():
        for q in range(cfg.n_q):
            m.rvq.codebooks[q] = torch.cat([eye, -eye]) * 0.25 ** q
    return m


# CALM's cycle: the rows of a 4 x 4 Hadamard matrix (unit variance, any two 2.8 apart)
HADAMARD = torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
# objective -> (steps, lr); measured: every one reaches the answer with margin on 3 seeds
CALM_RECIPES = {'trigflow': (200, 1e-2), 'consistency': (300, 5e-3)}


@pytest.mark.parametrize('objective', ['trigflow', 'consistency'])
def test_calm_learns_a_made_sequence(objective):
    torch.manual_seed(0)
    m = tiny_calm(objective)
    m.frames = HADAMARD
    stats = fit(m, *CALM_RECIPES[objective])
    gen, answer = continues_the_cycle(m)
    # every generated frame is the right frame of the cycle (the others are 2.8 away)
    nearest = torch.cdist(gen[0], m.frames).argmin(1)
    assert torch.equal(nearest, torch.arange(3, 3 + 2 * P) % P), nearest
    assert (gen - answer).abs().max() < 0.5, (gen - answer).abs().max()
    # held out: every frame predicted but the first of each window
    assert stats['val_mse'] < first_frame_bound(m.frames, S) + 0.05, stats


@pytest.mark.parametrize('kind', ['rq', 'delay'])
def test_discrete_lm_learns_a_made_sequence(kind):
    torch.manual_seed(0)
    m = tiny_discrete(kind)
    g = torch.Generator().manual_seed(5)
    codes = torch.stack([torch.randperm(8, generator=g)[:P] for _ in range(3)], 1)   # [P, Q]
    m.frames = m.rvq.decode(codes)
    assert torch.equal(m.rvq.encode(m.frames), codes)
    stats = fit(m, 150, 3e-3)
    gen, answer = continues_the_cycle(m)
    assert torch.equal(m.rvq.encode(gen), m.rvq.encode(answer))      # the exact codes
    assert torch.allclose(gen, answer)
    # held out: cross-entropy near 0 but for a window's first frame; its argmax frames decoded (the
    # delay LM scores the S - Q + 1 frames whose every level is inside the window)
    assert stats['val_ce'] < 0.25, stats
    mse = stats['val_mse' if kind == 'rq' else 'val_mse_true_lower']   # rq.DelayLM.held_out
    assert mse <= first_frame_bound(m.frames, S - 2) + 1e-6, stats
