"""
A trained run end to end: load the VAE and the language model that train.py wrote into a run
folder, and continue a toy clip with them, the way data flows in calm:

    wav -> vae.encode -> latents -> LM.generate -> latents -> vae.decode -> wav

    vae, lm = load('out/toy')                 # both in eval mode; the LM of whichever kind
    wav = continue_clip(vae, lm, clip, p, c)  # the clip's first p frames, then c generated ones

sample.py does the same inline for your own prompt; evaluate.py and tour.py use these. The kind of
LM a run holds is resolved here, once, into an object with calm.CALM's interface (KINDS), and
validation scores every kind the same way on held-out frames (train.py logs it).
"""
import dataclasses
import os

import torch

import calm
import rq
import vae as vae_lib

# The LMs a run can hold, by the name train.py --model takes and calm.pt records. They share one
# interface (calm.CALM's): forward (the training loss), prepare, held_out, describe, generate with
# check_sampling, and new_state / step_backbone / sample_head / head for the per-frame timings;
# multistep says whether the head takes a number of steps.
KINDS = {'calm': calm.CALM, 'rq': rq.RQTransformer, 'delay': rq.DelayLM}


def build(kind, config):
    """The LM of a kind from its config's fields (a dict, as calm.pt stores them)."""
    if kind == 'calm':   # checkpoints from before Config.time_scale existed were trained with 100
        return calm.CALM(calm.Config(**{'time_scale': 100.0, **config}))
    return KINDS[kind](rq.Config(**config))


def read_checkpoint(path, what, device='cpu'):
    """The dict train.py saved at path, checked to be what the caller reads it as: 'vae' (vae.pt)
    or 'lm' (calm.pt, a language model of any kind). A missing, empty, damaged or swapped file is a
    ValueError of one line (entry points print it), not a traceback from deep inside torch."""
    if not os.path.isfile(path):
        raise ValueError(f'no checkpoint {path}: train one with `python train.py --toy` or pass '
                         '--ckpt RUN_DIR')
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:   # torch.load raises many types: EOFError, UnpicklingError, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f'{path} is not a readable checkpoint ({reason})') from None
    config = ck.get('config') if isinstance(ck, dict) else None
    if not (isinstance(config, dict) and 'model' in ck):
        raise ValueError(f'{path} is not a checkpoint written by train.py')
    holds = 'vae' if 'ratios' in config else 'lm'   # only the VAE's config has conv ratios
    if holds != what:
        names = {'vae': 'the VAE (vae.pt)', 'lm': 'a language model (calm.pt)'}
        raise ValueError(f'{path} holds {names[holds]}, not {names[what]}: are vae.pt and calm.pt '
                         'swapped?')
    if what == 'lm' and ck.get('kind', 'calm') not in KINDS:
        raise ValueError(f"{path} holds an LM of unknown kind {ck['kind']!r} (known: "
                         f"{', '.join(KINDS)})")
    return ck


def load_weights(model, ck, path):
    """model.load_state_dict(ck['model']), one line if the weights do not fit the config."""
    try:
        model.load_state_dict(ck['model'])
    except RuntimeError as e:
        raise ValueError(f'{path}: the weights do not fit the model its config describes '
                         f'({str(e).splitlines()[0]})') from None


def load_vae(path, device='cpu'):
    """(VAE in eval mode, checkpoint dict) from a vae.pt, checked (read_checkpoint)."""
    vk = read_checkpoint(path, 'vae', device)
    try:
        vae = vae_lib.VAE(vae_lib.Config(**vk['config']))
    except TypeError as e:   # a field this version of vae.Config does not have
        raise ValueError(f'{path}: its config does not fit vae.Config ({e})') from None
    load_weights(vae, vk, path)
    return vae.to(device).eval(), vk


def load(run_dir, device='cpu', around=None):
    """(vae, model) from a run folder written by train.py, both in eval mode. The configs travel in
    the checkpoints, so no flag has to repeat them. A run trained with --vae-from finds its VAE
    through the path stored in calm.pt. calm.pt holds the run's LM: CALM, or a discrete baseline
    (ck['kind'], rq.py). A missing or wrong checkpoint is a ValueError of one line. around: 'noise'
    or 'mean' in place of the CALM config's temperature_around (calm.CALM.sample_head)."""
    path = os.path.join(run_dir, 'calm.pt')
    ck = read_checkpoint(path, 'lm', device)
    try:
        model = build(ck.get('kind', 'calm'), ck['config'])
    except TypeError as e:
        raise ValueError(f'{path}: its config does not fit its kind of LM ({e})') from None
    load_weights(model, ck, path)
    if around is not None:
        if not model.multistep:
            raise ValueError('--around is for CALM runs: a discrete LM samples codes')
        model.cfg = dataclasses.replace(model.cfg, temperature_around=around)
        calm.check_config(model.cfg)
    vae_path = os.path.join(run_dir, 'vae.pt')
    vae, _ = load_vae(vae_path if os.path.isfile(vae_path) else ck.get('vae', vae_path), device)
    return vae, model.to(device).eval()


@torch.no_grad()
def next_frames(model, x, every=8):
    """The greedy (temperature 0) next frame of x [B, S, D] given its true past, at frames
    s = every, 2 every, ... < S, as the LM's own generate makes it from the prompt x[:, :s]: a
    discrete LM quantises the past and dequantises its frame, and the delay LM rolls its Q - 1
    lagging levels forward, so no LM sees any part of frame s. Returns (positions, frames
    [B, len(positions), D])."""
    g = torch.Generator(x.device).manual_seed(0)   # the global RNG stays as it was: resume exact
    pos = list(range(every, x.shape[1], every))
    return pos, torch.stack([model.generate(x[:, :s], 1, temperature=0.0, generator=g)[:, 0]
                             for s in pos], 1)


def validation(model, x):
    """Held-out stats: val_next_mse, the one measure computed the same way for every kind of LM:
    the squared error of next_frames against the true latent frames (standardised units); then
    the LM's own held_out scores (CALM and RQ val_mse: the same quantity, teacher-forced at every
    frame; the delay LM's val_mse_true_lower: with the true lower levels of the frame)."""
    pos, pred = next_frames(model, x)
    return {'val_next_mse': float(((pred - x[:, pos]) ** 2).mean()), **model.held_out(x)}


@torch.inference_mode()
def continue_clip(vae, model, clip, p, c, steps, temperature, generator, device):
    """Encode the first p frames of a toy clip, generate c frames, decode prompt + continuation ->
    numpy wav. Batch 1: prompts differ in length. A prompt longer than the model context keeps its
    last part (as sample.py does) for the model; the decoded audio keeps the whole prompt so times
    match the clip. temperature None: the model's default."""
    prompt = vae.encode(torch.tensor(clip.wav[None, :p * vae.hop], device=device))
    ctx = getattr(getattr(model, 'cfg', None), 'context', p)
    kw = {} if temperature is None else {'temperature': temperature}
    new = model.generate(prompt[:, -ctx:], c, steps=steps, generator=generator, **kw)
    # an RVQ codec's decoder reads the prompt's codewords (vae.VAE.quantise)
    return vae.decode(torch.cat([vae.quantise(prompt), new], 1))[0].float().cpu().numpy()
