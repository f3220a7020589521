"""
Gaussian mixtures with a known answer, and calm's head trained alone on one: what the tests, the
tour's figure 03 and bench/map.py check a consistency head against. Read it with calm.py's opening
paragraph, when you want to see a consistency map learnt.

A mixture stays a mixture under x_t = cos t x_0 + sin t z (component k becomes
N(cos t mu_k, (cos^2 t s^2 + sin^2 t) I)), so its TrigFlow velocity E[v_t | x_t] is exact in closed
form, hence the PF-ODE, hence the map a consistency model must learn (calm.py's opening paragraph).

    mix = TWO_MODES                          # (w [K], mu [K, D], s), float64, unit std
    F = velocity(mix, x_t, t)                # the exact E[v_t | x_t]
    times, xs = ode_paths(mix, noise)        # xs[-1]: where the PF-ODE takes each noise
    m = train_head_alone('consistency', lambda n: sample(mix, n), D=1, n_iter=3000)
"""
import math

import numpy as np
import torch

import calm


def mixture(w, mu, s):
    """x_0 ~ sum_k w_k N(mu_k, s^2 I), scaled to unit std (sigma_d = 1): (w [K], mu [K, D], s) in
    float64."""
    w, mu = torch.tensor(w, dtype=torch.float64), torch.tensor(mu, dtype=torch.float64)
    m = (w[:, None] * mu).sum(0)
    sd = ((w[:, None] * (mu ** 2 + s ** 2)).sum(0) - m ** 2).mean().sqrt()
    return w, mu / sd, s / sd.item()


TWO_MODES = mixture([0.3, 0.7], [[-1.0], [1.0]], 0.1)   # 1-D: figure 03 and the map tests
# 5 modes in 4 dims, means drawn once (seed 0): the slow map test
FIVE_MODES = mixture([0.1, 0.15, 0.2, 0.25, 0.3],
                     torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).tolist(), 0.15)


def velocity(mix, x, t):
    """F(x_t, t) = E[v_t | x_t] (sigma_d = 1): per component, E[x_0 | x_t, k] and E[z | x_t, k] are
    Gaussian regressions; weight them by the posterior probability of k given x_t.
    x [N, D], t [N] -> [N, D]."""
    w, mu, s = mix
    x, t = x.double(), t.double()[:, None]
    c, si = t.cos(), t.sin()
    V = c ** 2 * s ** 2 + si ** 2                                      # [N, 1]
    r = x[:, None] - c[:, :, None] * mu                                # [N, K, D]
    logits = w.log() - 0.5 * (r ** 2).sum(-1) / V - 0.5 * mu.shape[1] * V.log()
    post = torch.softmax(logits, 1)[..., None]
    e_x0 = (post * (mu + (c * s ** 2 / V)[..., None] * r)).sum(1)
    e_z = (post * ((si / V)[..., None] * r)).sum(1)
    return c * e_z - si * e_x0


def ode_paths(mix, x_noise, n=400):
    """The exact PF-ODE dx/dt = F(x, t) from t = pi/2 to 0, RK4 in float64 (400 steps: converged to
    ~1e-7): times [n+1], x [n+1, N, D]; row -1 is the map a consistency model must learn."""
    ts = np.linspace(math.pi / 2, 0, n + 1)
    Fn = lambda x, t: velocity(mix, x, torch.full((len(x),), t, dtype=torch.float64))
    x = torch.as_tensor(x_noise, dtype=torch.float64)
    xs = [x]
    for a, b in zip(ts[:-1], ts[1:]):
        h = b - a
        k1 = Fn(x, a)
        k2 = Fn(x + h / 2 * k1, a + h / 2)
        k3 = Fn(x + h / 2 * k2, a + h / 2)
        k4 = Fn(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        xs.append(x)
    return ts, torch.stack(xs).numpy()


def sample(mix, n):
    """n draws x_0 [n, D], float32."""
    w, mu, s = mix
    return (mu[torch.multinomial(w, n, replacement=True)] + s * torch.randn(n, mu.shape[1])).float()


def density(mix, x):
    """The density of a 1-D mixture on a numpy grid x."""
    w, mu, s = mix
    return sum(wk * np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))
               for wk, m in zip(w.tolist(), mu[:, 0].tolist()))


def train_head_alone(head_loss, sample_x0, D, n_iter, seed=0, batch=512, lr=2e-3, loss_fn=None,
                     lr_scale=None, ema=0.0, prepare=None, **config):
    """calm's head (and its adaptive weight) trained alone on x_0 = sample_x0(batch) [batch, D], the
    conditioning z pure noise (x_0 does not depend on it): Adam, lr decaying linearly to 0,
    gradients clipped at 1 as train.py clips. Its own loop rather than train.train's: no backbone,
    no data pipeline, no checkpoints. The loss is CALM.objective unless loss_fn(model, z, x0, i)
    replaces it (bench/map.py's variants); prepare(model), called once, may change the model and
    returns more parameters to train (bench/map.py's LSD variants); lr_scale(i) multiplies the lr;
    ema > 0 returns the exponential moving average of the head's weights with that decay; config:
    more calm.Config fields. Returns the model in eval mode."""
    torch.manual_seed(seed)
    cfg = calm.Config(**{**dict(latent_dim=D, d_model=8, n_layers=1, n_heads=1, context=4,
                                short_context=0, head_width=64, head_blocks=2, head_loss=head_loss,
                                head_batch_mul=1, tangent_warmup=n_iter // 10), **config})
    m = calm.CALM(cfg)
    params = list(m.head.parameters())
    params += list(m.weight_net.parameters()) if m.weight_net is not None else []
    params += list(prepare(m)) if prepare is not None else []
    opt = torch.optim.Adam(params, lr=lr)
    average = [q.detach().clone() for q in m.head.parameters()] if ema else None
    for i in range(n_iter):
        for gr in opt.param_groups:
            gr['lr'] = lr * (1 - i / n_iter) * (lr_scale(i) if lr_scale else 1.0)
        z, x0 = torch.randn(batch, cfg.d_model), sample_x0(batch)
        loss = m.objective(z, x0, i)[0] if loss_fn is None else loss_fn(m, z, x0, i)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if average is not None:
            with torch.no_grad():
                for e, q in zip(average, m.head.parameters()):
                    e.lerp_(q, 1 - ema)
    if average is not None:
        with torch.no_grad():
            for e, q in zip(average, m.head.parameters()):
                q.copy_(e)
    return m.eval()
