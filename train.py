"""
Train calm: first the audio VAE, then the language model on its latents. Read it after calm.py:
it is the one training loop of calm (train), and the two stages that feed it (train_vae, train_lm).

    python train.py --toy                   # the whole toy pipeline -> out/toy: 20-30 min on
                                            # 2 CPU cores (on CUDA the LM trains 9000 x 128 windows)
    python train.py --data my_audio/ --out out/mine   # a folder (searched recursively) of audio
    python train.py --stage lm --vae-from out/toy --out out/with_short --short-context 10
    torchrun --nproc_per_node=2 train.py --toy   # DistributedDataParallel (gloo: CPU, nccl: GPU)

Data flows one way (paper Eq. 2-3): wav -> VAE encoder -> latents (encoded ONCE and cached,
standardised so that sigma_d = 1) -> CALM backbone + head. `--resume` continues exactly where a run
stopped: the batch of step s is a pure function of (seed, s), and a checkpoint (runs.py) holds the
RNG of the model's noises. Each stage's recipe is printed with why, and kept in <run>/config.json.
"""
import argparse
import dataclasses
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import calm
import corpus
import data
import pipeline
import rq
import runs
import vae as vae_lib

# Training recipes (model shapes: vae.Config / calm.Config), sized for the toy on 2 CPU cores.
RECIPES = {
    'vae': dict(steps=1500, batch=16, crop=1.0, lr=2e-3, warmup=50, wd=0.0),
    'lm': dict(steps=5000, batch=32, lr=4e-3, warmup=50, wd=0.01, sct_lr=1.0),
}
# sct_lr: the lr fraction of a consistency run's sCT phase; the toy's sCT trains the head alone
# (calm.TOY.sct_head_only), so it keeps the full lr (docs/toy.md; else 0.1: docs/findings.md).
# Toy training sets: the VAE's 512 clips x 8 s (~68 min); the LM's latents of 4096 clips (~9 h),
# enough to continue a motif rather than memorise them (docs/findings.md). encode_batch: LM clips
# per vae.encode call; a batch rounds differently (~4e-5), so a toy run's numbers change with it.
TOY_CLIPS = dict(n=512, lm_n=4096, seconds=8.0, lm_seconds=8.0, encode_batch=32)
# On a CUDA device the LM trains 9000 steps of 128 windows, 7x the windows of the CPU recipe: the
# budget that continuing the motif needs (docs/findings.md, "What does a GPU budget learn?").
GPU_LM = dict(steps=9000, batch=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--toy', action='store_true',
                   help='train on generated toy music (default when --data is absent)')
    p.add_argument('--clips', type=int, default=TOY_CLIPS['n'],
                   help=f"number of toy training clips (default {TOY_CLIPS['n']})")
    p.add_argument('--lm-clips', type=int,
                   help='number of toy clips whose latents train the LM (default: 8 x --clips = '
                        f"{TOY_CLIPS['lm_n']}); the first --clips of them are the VAE's")
    p.add_argument('--lm-seconds', type=float,
                   help=f"seconds per toy clip of the LM (default {TOY_CLIPS['lm_seconds']:g})")
    p.add_argument('--data', help='folder of your own audio (wav/flac/ogg/mp3, searched '
                                  'recursively; read from disk as needed, resampled and mixed to '
                                  'mono; docs/scale.md)')
    p.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1),
                   help='with --data: DataLoader processes reading VAE crops ahead (default: '
                        'min(4, CPUs); 0 = none)')
    p.add_argument('--stage', choices=['all', 'vae', 'lm'], default='all',
                   help='what to train (default: all)')
    p.add_argument('--out', default='out/toy',
                   help='run folder for checkpoints, caches and logs (default: out/toy)')
    p.add_argument('--vae-from',
                   help='with --stage lm: take the VAE (and its latent cache) from this run folder')
    p.add_argument('--preset', choices=['toy', 'small', 'paper'], default='toy',
                   help='model sizes: toy (CPU), small (one GPU, your own speech or music), paper '
                        '(several GPUs)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --out where it stopped, with the same settings (a '
                        'new step budget is allowed: runs.RESUME_MAY_CHANGE)')
    p.add_argument('--vae-steps', type=int,
                   help=f"VAE training steps (toy: {RECIPES['vae']['steps']})")
    p.add_argument('--lm-steps', type=int,
                   help=f"LM training steps (default: {RECIPES['lm']['steps']} on CPU, "
                        f"{GPU_LM['steps']} on CUDA)")
    p.add_argument('--lm-batch', type=int,
                   help=f"LM batch in training windows (default: "
                        f"{RECIPES['lm']['batch']} on CPU, {GPU_LM['batch']} on CUDA)")
    p.add_argument('--lm-window', type=int,
                   help='LM training window in frames (default: the context; longer windows train '
                        'the sliding attention that generation past the context uses)')
    p.add_argument('--lm-lr', type=float,
                   help=f"LM peak learning rate (default {RECIPES['lm']['lr']:g})")
    p.add_argument('--lm-sct-lr', type=float,
                   help='CALM, consistency head after a TrigFlow phase: the sCT phase trains at '
                        f"this fraction of the lr schedule (default {RECIPES['lm']['sct_lr']:g})")
    p.add_argument('--minutes', type=float,
                   help='time budget per stage: save and stop when it runs out')
    p.add_argument('--stop-after', type=int,
                   help='stop after this many steps of this invocation (resumable)')
    p.add_argument('--ckpt-every', type=int, default=100,
                   help='steps between checkpoints (default 100)')
    p.add_argument('--log-every', type=int, default=25, help='steps between log lines')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (GPU)')
    p.add_argument('--model', choices=list(pipeline.KINDS), default='calm',
                   help='the LM: calm (continuous latents), or a discrete baseline on RVQ codes of '
                        'the latents (rq.py, same backbone): rq = RQ-Transformer (depth '
                        'Transformer), delay = MusicGen delay pattern')
    p.add_argument('--lr-shape', choices=['sct', 'cosine'],
                   help="LM lr schedule: 'sct' = the cosine x sct_lr (0.1) from the step where "
                        "the toy's consistency run starts its sCT phase (600 of 950), 'cosine' = "
                        "the plain cosine. Default: 'sct' for consistency CALM runs and the "
                        "discrete LMs, 'cosine' for TrigFlow CALM runs")
    p.add_argument('--levels', type=int,
                   help=f'--model rq/delay: RVQ levels Q (default {rq.Config.n_q})')
    p.add_argument('--codebook-size', type=int,
                   help=f'--model rq/delay: codewords per level V (default '
                        f'{rq.Config.codebook_size})')
    # The paper's ablations (and the TrigFlow head) as flags; any other field via --lm.FIELD=VALUE.
    p.add_argument('--head-loss', choices=['trigflow', 'consistency', 'lsd'],
                   help='the head objective: consistency (sCT, the default), trigflow (diffusion, '
                        'ODE sampling) or lsd (a flow map by Lagrangian self-distillation, as '
                        'pocket-tts trains its head)')
    p.add_argument('--head-batch-mul', type=int, help='head batch multiplier M (1 disables it)')
    p.add_argument('--short-context', type=int,
                   help='frames K seen by the short-context Transformer (0 disables)')
    p.add_argument('--no-noise-aug', action='store_true',
                   help='disable noise augmentation of the backbone input')
    p.epilog = ('Config overrides: --vae.FIELD=VALUE and --lm.FIELD=VALUE for any field of '
                'vae.Config / calm.Config (rq.Config with --model rq/delay; e.g. '
                '--lm.n_layers=2). Tuples take comma-separated values. A discrete codec trained '
                'end to end: --vae.bottleneck=rvq --vae.rvq_levels=Q --vae.rvq_codebook=K, then '
                '--model rq or delay on its codes (docs/discrete.md).')
    args, rest = p.parse_known_args(argv)
    args.overrides = {'vae': {}, 'lm': {}}
    for item in rest:
        key, eq, value = item.partition('=')
        prefix, _, field = key.lstrip('-').partition('.')
        if not (eq and prefix in args.overrides and field):
            p.error(f'unrecognized argument: {item}')
        args.overrides[prefix][field] = value
    return args


def override(cfg, values):
    """Apply --vae.FIELD=VALUE strings to a dataclass config, converting to each field's type."""
    types = {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    changes = {}
    for name, value in values.items():
        if name not in types:
            raise SystemExit(f'error: {type(cfg).__module__}.Config has no field {name!r} '
                             f'(fields: {", ".join(types)})')
        t = types[name]
        if t is bool:
            changes[name] = value.lower() in ('1', 'true', 'yes', 'on')
        elif t is tuple:
            changes[name] = tuple(int(v) for v in value.split(','))
        else:
            changes[name] = t(value)
    return dataclasses.replace(cfg, **changes)


def or_exit(f, *args, **kwargs):
    """f(*args, **kwargs), a library's one-line ValueError as this script's exit (no traceback)."""
    try:
        return f(*args, **kwargs)
    except ValueError as e:
        raise SystemExit(f'error: {e}')


def resumed(args, name):
    """The checkpoint `name` ('vae.pt' or 'calm.pt') in --out that --resume continues, or None."""
    return or_exit(runs.resumed, args.out, name, args.resume)


def recipe_reason(stage, args):
    """One line: the recipe a stage trains with, the defaults it comes from (the LM's: by device)
    and the flags that changed them; printed at the start of every run."""
    if stage == 'vae':
        r = RECIPES['vae']
        steps, batch, what = args.vae_steps or r['steps'], r['batch'], 'crops'
        why = ["train.RECIPES['vae'] (the same on every device)"]
        why += [f'--vae-steps {args.vae_steps}'] if args.vae_steps else []
    else:
        cuda = args.device.startswith('cuda')
        recipe, other = lm_recipe(args, calm.TOY)[0], RECIPES['lm'] if cuda else GPU_LM
        steps, batch, what = recipe['steps'], recipe['batch'], 'windows'
        name, elsewhere = ('GPU_LM', 'a CPU') if cuda else ("RECIPES['lm']", 'a CUDA device')
        why = [f"train.{name} because the device is {args.device} "
               f"({elsewhere} takes {other['steps']} x {other['batch']})"]
        why += [f'--lm-steps {args.lm_steps}'] if args.lm_steps else []
        why += [f'--lm-batch {args.lm_batch}'] if args.lm_batch else []
        why += [f'--lm-{k.replace("_", "-")} {v:g}' for k, v in
                (('window', args.lm_window), ('lr', args.lm_lr), ('sct_lr', args.lm_sct_lr))
                if v is not None]
        why += [f'--lm-seconds {args.lm_seconds:g}'] if args.lm_seconds is not None else []
        why += [f'--lr-shape {args.lr_shape}'] if args.lr_shape else []
    why += [f'--{stage}.{k}={v}' for k, v in args.overrides[stage].items()]
    return f'{steps} steps x {batch} {what}: ' + ', '.join(why)


# --------------------------------------------------------------------------------------------------
# One training loop for both stages

def lr_schedule(recipe, steps, cfg):
    """lr(step): linear warmup, cosine to 10% (nanoGPT's); x recipe['sct_lr'] from step
    recipe['sct_from'] on (None: never); without that key (a CALM run's default), in sCT after a
    TrigFlow phase."""
    if 'sct_from' in recipe:
        sct_from = math.inf if recipe['sct_from'] is None else recipe['sct_from']
    else:
        tuning = (getattr(cfg, 'head_loss', '') == 'consistency'
                  and getattr(cfg, 'diffusion_steps', 0) > 0)
        sct_from = cfg.diffusion_steps if tuning else math.inf

    def lr_at(s):
        lr = recipe['lr'] * (recipe.get('sct_lr', 1.0) if s >= sct_from else 1.0)
        if s < recipe['warmup']:
            return lr * (s + 1) / recipe['warmup']
        frac = (s - recipe['warmup']) / max(1, steps - recipe['warmup'])
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
    return lr_at


def train(stage, model, cfg, recipe, get_batch, ckpt_path, args, ddp, log, extra=None,
          validate=None, adversary=None):
    """Train `model` for recipe['steps'] steps of AdamW with linear warmup + cosine decay.
    get_batch(step) must be a pure function of the step (resume reproduces the data order);
    model(batch, step) returns (loss, stats); validate(), if given, returns held-out stats (run in
    eval mode), logged at every checkpoint; adversary (VAE-GAN), if given, adds its terms to the
    loss and trains a discriminator. Returns (finished, stats of the last step and validation)."""
    device = args.device
    opt = make_optimizer(stage, model, recipe)
    step, steps = 0, recipe['steps']
    if args.resume and os.path.exists(ckpt_path):
        step, before = runs.resume(ckpt_path, model, opt, adversary, device)
        if log.enabled:
            budget = f' (a new budget: it was {before})' if before != steps else ''
            print(f'{stage}: resuming from {ckpt_path} at step {step}/{steps}{budget}')
    lr_at = lr_schedule(recipe, steps, cfg)

    def checkpoint():   # rank 0 writes
        if log.enabled:
            runs.save(ckpt_path, cfg, model, opt, step, steps, recipe, extra, adversary)

    def held_out():
        model.eval()
        stats.update(validate())
        model.train()
        vals = ' | '.join(f'{k} {v:.4g}' for k, v in stats.items() if k.startswith('val'))
        log({'stage': stage, 'step': step, **stats}, f'{stage} {step:>5}/{steps} | held-out {vals}')

    net = DDP(model) if ddp else model
    if args.compile:
        net = torch.compile(net)
    autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if device.startswith('cuda')
                else torch.autocast('cpu', enabled=False))
    model.train()
    t_start, t_log, s_log, stats, done_here = time.time(), time.time(), step, {}, 0
    try:
        while step < steps:
            for g in opt.param_groups:
                g['lr'] = lr_at(step)
            batch, text = get_batch(step), None
            if isinstance(batch, tuple):  # (latents, description ids): a text-conditioned LM
                batch, text = batch[0], batch[1].to(device)
            batch = batch.to(device, non_blocking=True)
            with autocast:
                loss, stats = net(batch, step, text) if stage == 'lm' else net(batch)
                if adversary is not None:  # updates the discriminator, returns the VAE's terms
                    loss = loss + adversary(step, steps, lr_at(step), *model.last, stats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            groups = (model.grad_groups() if hasattr(model, 'grad_groups')
                      else {'grad_norm': model.parameters()})
            stats.update({k: float(torch.nn.utils.clip_grad_norm_(ps, 1.0))
                          for k, ps in groups.items()})
            opt.step()
            step += 1
            done_here += 1
            if step % args.log_every == 0 or step == steps:
                rate = (step - s_log) / (time.time() - t_log)
                t_log, s_log = time.time(), step
                eta = corpus.fmt_time((steps - step) / max(rate, 1e-9))
                line = ' | '.join(f'{k} {v:.4g}' for k, v in stats.items())
                log({'stage': stage, 'step': step, 'lr': lr_at(step - 1), 'steps_per_s': rate,
                     **stats},
                    f'{stage} {step:>5}/{steps} | {line} | {rate:.2f} steps/s | ETA {eta}')
            if step % args.ckpt_every == 0:
                checkpoint()
                if validate is not None and step < steps:
                    held_out()
            out_of_time = args.minutes is not None and time.time() - t_start > 60 * args.minutes
            if out_of_time or (args.stop_after is not None and done_here >= args.stop_after):
                if log.enabled:
                    why = 'time budget' if out_of_time else '--stop-after'
                    print(f'{stage}: stopping at step {step}/{steps} ({why}); continue with '
                          '--resume')
                break
    except KeyboardInterrupt:
        if log.enabled:
            print(f'\n{stage}: interrupted at step {step}; checkpoint saved, continue with '
                  '--resume')
        checkpoint()
        raise SystemExit(130)
    checkpoint()
    if validate is not None and step >= steps:
        held_out()
    if ddp:  # the VAE-GAN's discriminator too
        disc = adversary.disc.parameters() if adversary else []
        runs.check_replicas(stage, [*model.parameters(), *disc], log)
    model.eval()
    return step >= steps, stats


def make_optimizer(stage, model, recipe):
    """AdamW, weight decay on matrices only (nanoGPT's)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': recipe['wd']},
                              {'params': other, 'weight_decay': 0.0}],
                             lr=recipe['lr'], betas=(0.9, 0.95) if stage == 'lm' else (0.8, 0.99))


# --------------------------------------------------------------------------------------------------
# Stage 1: the VAE (paper Eq. 2, the VAE-GAN loss, without the adversarial terms in the toy)

def load_audio_set(args):
    """The training audio: the toy clips (float32 arrays at data.SR), or for --data a corpus.Index
    of the user's files (headers only, cached in the run folder; the audio stays on disk)."""
    if not args.data:
        return [c.wav for c in data.toy_clips('train', args.clips, TOY_CLIPS['seconds'])]
    return or_exit(corpus.audio_index, args.data, os.path.join(args.out, 'index.json'))


def vae_recipe(args, resumed=None):
    """RECIPES['vae'] (the same on every device), then --vae-steps; a run --resume continues
    (resumed: its checkpoint) keeps its own budget unless --vae-steps is given."""
    steps = args.vae_steps or (resumed and resumed['steps'])
    return dict(RECIPES['vae'], **({'steps': steps} if steps else {}))


def train_vae(args, clips, ddp, rank, log):
    cfg = override(getattr(vae_lib, args.preset.upper()), args.overrides['vae'])
    recipe = vae_recipe(args, resumed(args, 'vae.pt'))
    runs.record_run(args, 'vae', cfg, recipe, recipe_reason('vae', args), ddp, log)
    torch.manual_seed(args.seed + rank)  # each stage seeds itself: a resume re-creates the init
    model = vae_lib.VAE(cfg).to(args.device)
    length = int(recipe['crop'] * cfg.sample_rate) // model.hop * model.hop
    adversary = vae_lib.Adversary(cfg, args.seed, args.device, ddp) if cfg.discriminator else None
    if log.enabled:
        gan = (f'; VAE-GAN, discriminator {adversary.describe(recipe["steps"])}'
               if adversary else '')
        print(f'vae: {calm.n_params(model) / 1e6:.2f}M params, {model.frame_rate:g} frames/s, '
              f'{cfg.latent_dim} dims; {len(clips)} clips; {recipe["steps"]} steps of '
              f'{recipe["batch"]} x {recipe["crop"]} s{gan}')
    if isinstance(clips, corpus.Index):  # --data: workers read crops from disk, pure in the step
        dataset = corpus.CropDataset(clips, args.seed, recipe['batch'], length, cfg.sample_rate,
                                     rank)
        get_batch = corpus.CropLoader(dataset, args.workers,
                                      pin_memory=args.device.startswith('cuda'))
    else:
        get_batch = lambda s: torch.from_numpy(
            data.crop_batch(clips, s, args.seed, recipe['batch'], length, rank))
    path = os.path.join(args.out, 'vae.pt')
    finished, stats = train('vae', model, cfg, recipe, get_batch, path, args, ddp, log,
                            adversary=adversary)
    if finished:
        # Standardise the latents for the LM (as pocket-tts does): TrigFlow assumes a known sigma_d,
        # so the LM reads (mu - mean) / std, sigma_d = 1. An RVQ codec's LM reads its codes instead.
        if model.rvq is None:
            with torch.no_grad():
                mus = [model.posterior(torch.from_numpy(w)[None].to(args.device))[0][0]
                       for w in corpus.stats_audio(clips, cfg.sample_rate)]
            model.set_latent_stats(torch.cat(mus))
        if log.enabled:
            runs.mark_done(path, model)
    return model, finished, stats


# --------------------------------------------------------------------------------------------------
# Stage 2: the language model on cached latents (paper Eq. 3)

def lm_recipe(args, cfg, resumed=None):
    """(recipe, cfg) of the LM stage: RECIPES['lm'], GPU_LM on a CUDA device, then the --lm-*
    flags. A consistency run's TrigFlow phase (calm.Config.diffusion_steps) keeps its share of a
    longer/shorter run; recipe['window'] (frames) defaults to cfg.context. The lr shape
    (--lr-shape, recipe['sct_from']): a discrete LM takes the consistency CALM run's, so every LM of
    a comparison has the same lr at every step. resumed: the checkpoint --resume continues; it keeps
    its budget unless --lm-steps is given, and its TrigFlow phase whatever the budget."""
    base = RECIPES['lm']
    steps = args.lm_steps or (resumed and resumed['steps'])
    recipe = {**base, **(GPU_LM if args.device.startswith('cuda') else {}),
              **({'steps': steps} if steps else {}),
              **({'batch': args.lm_batch} if args.lm_batch else {})}
    flags = {'window': args.lm_window, 'lr': args.lm_lr, 'sct_lr': args.lm_sct_lr}
    recipe.update({k: v for k, v in flags.items() if v is not None})
    share = lambda n: round(n * recipe['steps'] / base['steps'])
    if (recipe['steps'] != base['steps'] and getattr(cfg, 'diffusion_steps', 0)
            and 'diffusion_steps' not in args.overrides['lm']):
        cfg = dataclasses.replace(cfg, diffusion_steps=share(cfg.diffusion_steps))
    if (resumed and 'diffusion_steps' in resumed['config'] and hasattr(cfg, 'diffusion_steps')
            and 'diffusion_steps' not in args.overrides['lm']):
        cfg = dataclasses.replace(cfg, diffusion_steps=resumed['config']['diffusion_steps'])
    shape = getattr(args, 'lr_shape', None)
    if shape == 'cosine':
        recipe['sct_from'] = None
    elif shape == 'sct' or args.model != 'calm':
        # the step where the consistency CALM run of this preset and recipe starts its sCT phase
        switch = (cfg.diffusion_steps if args.model == 'calm'
                  else share(getattr(calm, args.preset.upper()).diffusion_steps))
        recipe['sct_from'] = switch or None
    return recipe, cfg


CALM_ONLY = {'head_loss': '--head-loss', 'head_batch_mul': '--head-batch-mul',
             'short_context': '--short-context', 'no_noise_aug': '--no-noise-aug',
             'lm_sct_lr': '--lm-sct-lr'}


def lm_config(args, vae):
    """calm.Config of the LM, or with --model rq/delay an rq.Config with the same backbone
    (rq.config_like): the flags of one kind of LM are checked here, once."""
    cfg = dataclasses.replace(getattr(calm, args.preset.upper()), latent_dim=vae.cfg.latent_dim)
    if not args.data and 'n_text' not in args.overrides['lm']:
        cfg = dataclasses.replace(cfg, n_text=len(data.VOCAB))  # toy runs are text-conditioned
    codec = vae.cfg if vae.rvq is not None else None   # an RVQ codec trained end to end
    if codec is not None and args.model == 'calm':
        raise SystemExit('error: this VAE has an RVQ bottleneck (--vae.bottleneck=rvq): train a '
                         'discrete LM on its codes (--model rq or delay)')
    if args.model == 'calm':
        if args.levels is not None or args.codebook_size is not None:
            raise SystemExit('error: --levels / --codebook-size are for the discrete LMs '
                             '(--model rq or delay)')
        flags = {'head_loss': args.head_loss, 'head_batch_mul': args.head_batch_mul,
                 'short_context': args.short_context}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
        if args.no_noise_aug:
            cfg = dataclasses.replace(cfg, noise_aug=False)
    else:
        used = [flag for k, flag in CALM_ONLY.items() if getattr(args, k) not in (None, False)]
        if used:
            raise SystemExit(f'error: {", ".join(used)}: CALM-only flag(s), not for --model '
                             f'{args.model}')
        qv = {'n_q': args.levels, 'codebook_size': args.codebook_size}
        if codec is not None:   # the codec's own codes: Q levels (or fewer) of its K codewords
            qv = {'n_q': args.levels or codec.rvq_levels,
                  'codebook_size': args.codebook_size or codec.rvq_codebook}
            if qv['n_q'] > codec.rvq_levels or qv['codebook_size'] != codec.rvq_codebook:
                raise SystemExit(f"error: the VAE's RVQ codec has {codec.rvq_levels} levels of "
                                 f"{codec.rvq_codebook} codewords; --levels {qv['n_q']} / "
                                 f"--codebook-size {qv['codebook_size']} do not fit")
        cfg = rq.config_like(cfg, kind=args.model,
                             **(rq.PAPER_DEPTH if args.preset == 'paper' else {}),
                             **{k: v for k, v in qv.items() if v is not None})
    cfg = override(cfg, args.overrides['lm'])
    if args.data and cfg.n_text:
        raise SystemExit('error: text conditioning needs the toy descriptions; --data runs are '
                         'unconditional')
    if cfg.n_text and cfg.n_text != len(data.VOCAB):
        raise SystemExit(f'error: --lm.n_text must be 0 or {len(data.VOCAB)} (the toy vocabulary)')
    if args.model != 'calm':
        or_exit(rq.check, cfg)
    return cfg


def train_lm(args, vae, clips, vae_dir, ddp, rank, log, times=None):
    """times (a dict), if given, gets the seconds spent rendering and encoding the LM's audio."""
    ck = resumed(args, 'calm.pt')
    recipe, cfg = lm_recipe(args, lm_config(args, vae), ck)
    window = recipe.get('window', cfg.context)
    seconds = TOY_CLIPS['lm_seconds'] if args.lm_seconds is None else args.lm_seconds
    if args.lm_seconds is not None and (args.data or seconds <= 0):
        raise SystemExit('error: --lm-seconds: the length of the toy clips in seconds (> 0); '
                         '--data files keep their own')
    if not args.data and not 0 < window <= vae.n_frames(round(seconds * data.SR)):
        raise SystemExit(f'error: --lm-window {window}: give 1 to the frames of one toy LM clip '
                         f'({vae.n_frames(round(seconds * data.SR))} in {seconds:g} s; raise '
                         '--lm-seconds for longer windows)')
    vae_path = os.path.abspath(os.path.join(vae_dir, 'vae.pt'))
    runs.record_run(args, 'lm', cfg, recipe, recipe_reason('lm', args), ddp, log,
                    vae=vae_path, kind=args.model)
    # the VAE's clips are the first toy clips; the LM sees args.lm_clips of them
    n = (len(clips) if args.data
         else args.lm_clips or TOY_CLIPS['lm_n'] * args.clips // TOY_CLIPS['n'])
    t_encode = time.time()
    latents = corpus.encode_all(vae, clips, n, os.path.join(vae_dir, 'latents'), args.device,
                                rank, seconds, TOY_CLIPS['encode_batch'])
    if times is not None:
        times['encode'] = time.time() - t_encode
    # the descriptions of toy clips data.clip_seed('train', i), as word ids (no audio rendered)
    texts = ([data.tokenize(data.clip_description(data.clip_seed('train', i)))
              for i in range(len(latents))] if cfg.n_text else None)
    torch.manual_seed(args.seed + rank)
    ckpt_path = os.path.join(args.out, 'calm.pt')  # the run's LM, whichever kind (ck['kind'])
    try:
        model = pipeline.KINDS[args.model](cfg)
        if not (args.resume and os.path.exists(ckpt_path)):   # a resumed run loads it instead
            if vae.rvq is not None:   # the codec's codebooks: the LM reads the codec's codes
                model.take_codebooks(vae.rvq, log)
            else:
                model.prepare(latents, args.seed, log)     # the discrete LMs fit their RVQ
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    model.to(args.device)
    if log.enabled:
        past = f' (context {cfg.context})' if window != cfg.context else ''
        print(f'lm: {model.describe()}; {recipe["steps"]} steps of {recipe["batch"]} x '
              f'{window} frames{past}')
    # Held-out windows: toy held-out clips, or (own data) a fixed batch of training windows.
    if args.data:
        val = corpus.window_batch(latents, 2**31, args.seed, 16, cfg.context)
    else:
        with torch.no_grad():
            held = data.toy_clips('heldout', 16, TOY_CLIPS['seconds'])
            val = torch.cat([vae.encode(torch.from_numpy(c.wav)[None].to(args.device))
                             [:, :cfg.context] for c in held])
    val = val.to(args.device)
    get_batch = lambda s: corpus.window_batch(latents, s, args.seed, recipe['batch'], window, rank,
                                              texts)
    return model, *train('lm', model, cfg, recipe, get_batch, ckpt_path, args, ddp, log,
                         extra={'vae': vae_path, 'kind': args.model},
                         validate=lambda: pipeline.validation(model, val))


# --------------------------------------------------------------------------------------------------
# Inputs, checked before anything is written

def check_inputs(args):
    """Everything a run reads, checked before main writes anything (a failing command leaves no run
    folder behind and never half-overwrites one): --data, the VAE an LM stage reads, the LM flags,
    and with --resume that the command describes the run its checkpoints hold."""
    if args.data and not os.path.isdir(args.data):
        raise SystemExit(f'error: --data: not a directory: {args.data}')
    if args.vae_from and args.stage != 'lm':
        raise SystemExit('error: --vae-from takes the VAE of another run: use it with --stage lm')
    vae_path = os.path.join(args.vae_from or args.out, 'vae.pt')
    stages = ('vae', 'lm') if args.stage == 'all' else (args.stage,)
    vae_cfg = override(getattr(vae_lib, args.preset.upper()), args.overrides['vae'])
    if 'vae' in stages and (ck := resumed(args, 'vae.pt')) is not None:
        or_exit(runs.check_resume, f'{args.out}/vae.pt', ck, vae_cfg, vae_recipe(args, ck))
    if 'lm' not in stages:
        return
    if args.stage == 'lm':
        vae_cfg = vae_lib.Config(**or_exit(runs.finished_vae, vae_path)['config'])
    # the kind of LM the checkpoint holds is checked before the flags of the command's kind
    ck = or_exit(runs.resumed, args.out, 'calm.pt', args.resume, kind=args.model)
    codec = True if vae_cfg.bottleneck == 'rvq' else None   # lm_config reads vae.rvq, vae.cfg
    cfg = lm_config(args, argparse.Namespace(cfg=vae_cfg, rvq=codec))   # the LM flags
    if ck is None:
        return
    recipe, cfg = lm_recipe(args, cfg, ck)
    # the VAE the LM reads, where the command names one (a run folder may have moved since)
    vae = ({'vae': (os.path.realpath(ck.get('vae', '')), os.path.realpath(vae_path))}
           if args.vae_from else {})
    or_exit(runs.check_resume, os.path.join(args.out, 'calm.pt'), ck, cfg, recipe, **vae)


def main(argv=None):
    args = parse_args(argv)
    ddp, rank = runs.setup(args)
    torch.manual_seed(args.seed + rank)  # the model's noise draws; the data is seeded per step
    np.random.seed(args.seed + rank)
    check_inputs(args)   # before anything is written: a command that fails leaves no run folder
    os.makedirs(args.out, exist_ok=True)
    log = runs.Log(args.out, rank == 0)
    t0 = time.time()
    if log.enabled:
        procs = f'DDP x{dist.get_world_size()}' if ddp else '1 process'
        print(f'run folder {args.out} | device {args.device} | {procs}')
        for stage in ('vae', 'lm') if args.stage == 'all' else (args.stage,):
            print(f'{stage} recipe: {recipe_reason(stage, args)}')

    clips = load_audio_set(args)
    summary, times = {}, {'audio': time.time() - t0}   # seconds per stage, printed at the end
    vae_dir = args.vae_from or args.out
    if args.stage in ('all', 'vae'):
        if not (resumed(args, 'vae.pt') or {}).get('done', False):
            t = time.time()
            _, finished, stats = train_vae(args, clips, ddp, rank, log)
            summary['vae'], times['vae'] = stats, time.time() - t
            if not finished:
                return
    if args.stage in ('all', 'lm'):
        if ddp:  # rank 0 may have just written the VAE
            dist.barrier()
        vae, _ = or_exit(pipeline.load_vae, os.path.join(vae_dir, 'vae.pt'), args.device)
        t = time.time()
        _, finished, stats = train_lm(args, vae, clips, vae_dir, ddp, rank, log, times)
        summary['lm'], times['lm'] = stats, time.time() - t - times.get('encode', 0)
    log.report(args.out, time.time() - t0, times, summary, args.data)
    if ddp:  # leave together: a rank whose peer tore down gloo already can abort at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
