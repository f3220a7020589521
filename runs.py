"""
A run of train.py and the folder it writes: the process (torchrun's DDP group, float settings), the
log (log.jsonl, and the report at the end), the resolved configs (config.json), the checkpoints
(vae.pt, calm.pt: weights, optimizer, step, recipe and RNG state, written atomically so that an
interruption loses nothing, and resumed exactly), and the check that a `--resume` command describes
the run its checkpoints hold. Errors are ValueErrors of one line (train.py prints them).
"""
import dataclasses
import json
import os

import numpy as np
import torch
import torch.distributed as dist

import corpus
import data
import pipeline

# What `--resume` may change: the step budget (--vae-steps / --lm-steps; the lr schedule then runs
# over the new total, and a consistency run keeps the TrigFlow phase it trained with: train.py's
# lm_recipe). Any other difference between the command and the checkpoint it continues, in the LM's
# kind, in a config field or in the recipe, is refused in one line before anything is written.
RESUME_MAY_CHANGE = {'steps'}


class Log:
    """Prints readable progress (loss, steps/s, ETA) and appends JSON lines to <run>/log.jsonl."""

    def __init__(self, run_dir, enabled):
        self.enabled = enabled
        self.path = os.path.join(run_dir, 'log.jsonl')

    def __call__(self, record, line=None):
        if not self.enabled:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        if line:
            print(line, flush=True)

    def report(self, out, seconds, times, summary, own_data):
        """The end of a run: its time, by part, each stage's final stats and what to try next."""
        if not self.enabled:
            return
        names = {'audio': 'audio index' if own_data else 'VAE clips', 'vae': 'VAE',
                 'encode': 'LM clips encoded', 'lm': 'LM'}
        print(f'\ndone in {corpus.fmt_time(seconds)} ('
              + ', '.join(f'{names[k]} {corpus.fmt_time(v)}' for k, v in times.items()) + ')')
        for stage, stats in summary.items():
            print(f'  {stage}: final ' + ', '.join(f'{k} {v:.4g}' for k, v in stats.items()))
        print(f'  checkpoints in {out}/ (try: python data.py prompt out/prompt.wav; '
              f'python sample.py out/prompt.wav --ckpt {out})')


def record_run(args, stage, cfg, recipe, why, ddp, log, **extra):
    """Write the stage's resolved config and recipe, and why (train.recipe_reason), into
    <run>/config.json (with the resolved arguments and the device): what a run did can be read
    back, not guessed from the command."""
    if not log.enabled:
        return
    path = os.path.join(args.out, 'config.json')
    run = {}
    if os.path.exists(path):
        with open(path) as f:
            run = json.load(f)
    run.update(args=vars(args), world_size=dist.get_world_size() if ddp else 1,
               torch=torch.__version__)
    run[stage] = {'config': dataclasses.asdict(cfg), 'recipe': recipe, 'why': why, **extra}
    data.write_json(path, run, indent=1)


def save(path, cfg, model, opt, step, steps, recipe, extra=None, adversary=None):
    """Write a checkpoint atomically: config, weights, optimizer, step of steps, recipe, the RNG
    state of the model's noises (so a resumed run draws what the uninterrupted one would), `extra`
    and the VAE-GAN adversary's state."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'cuda': cuda}
    ck = {'config': dataclasses.asdict(cfg), 'model': model.state_dict(),
          'optimizer': opt.state_dict(), 'step': step, 'steps': steps, 'rng': rng,
          'recipe': recipe, **(extra or {}),
          **(adversary.state_dict() if adversary is not None else {})}
    data.write_atomic(path, lambda tmp: torch.save(ck, tmp))


def resume(ckpt_path, model, opt, adversary, device):
    """Load weights, optimizer(s) and RNG state from a checkpoint; returns (step, steps)."""
    ck = torch.load(ckpt_path, map_location=device, weights_only=False)
    model.load_state_dict(ck['model'])
    opt.load_state_dict(ck['optimizer'])
    torch.set_rng_state(ck['rng']['torch'])
    np.random.set_state(ck['rng']['numpy'])
    if ck['rng']['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck['rng']['cuda'])
    if adversary is not None:
        adversary.load_state_dict(ck)
    return ck['step'], ck['steps']


def mark_done(path, model):
    """Mark the finished VAE's checkpoint done, with its final weights (the latent stats set)."""
    ck = torch.load(path, weights_only=False)
    ck['model'] = model.state_dict()
    ck['done'] = True
    data.write_atomic(path, lambda tmp: torch.save(ck, tmp))


def setup(args):
    """(ddp, rank) of this process, and its device's float settings. Under torchrun (WORLD_SIZE >
    1) it joins the process group (gloo on CPU; nccl on CUDA, each rank on the GPU of its
    LOCAL_RANK, which args.device is set to)."""
    ddp = int(os.environ.get('WORLD_SIZE', 1)) > 1
    rank = 0
    if ddp:  # launched by torchrun
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
        rank = dist.get_rank()
        if args.device.startswith('cuda'):
            args.device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
            torch.cuda.set_device(args.device)
    # CPU: flush denormal floats to zero: small weights/activations late in training otherwise fall
    # into the denormal range, and each step got ~6x slower (the toy VAE: 0.28 -> 1.6 s/step).
    torch.set_flush_denormal(True)
    if args.device.startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ddp, rank


def check_replicas(stage, params, log):
    """DDP: the replicas must hold identical weights (DDP all-reduces gradients); measure it."""
    flat = torch.cat([p.detach().flatten() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    log({'stage': stage, 'replica_max_abs_diff': float(diff)},
        f'{stage}: replicas differ by at most {float(diff):.3g}')


def resumed(out, name, resume=True, kind=None):
    """The checkpoint `name` ('vae.pt' or 'calm.pt') in the run folder `out` that --resume
    continues (pipeline.read_checkpoint), or None; kind: the LM the command trains, which an LM's
    checkpoint must hold."""
    path = os.path.join(out, name)
    if not (resume and os.path.exists(path)):
        return None
    ck = pipeline.read_checkpoint(path, 'lm' if name == 'calm.pt' else 'vae')
    if kind is not None and ck.get('kind', 'calm') != kind:
        raise ValueError(f"--resume: {path} holds a {ck.get('kind', 'calm')} LM, the command "
                         f"trains --model {kind}: repeat the run's command, or use another --out")
    return ck


def finished_vae(path):
    """The checkpoint of the VAE an LM stage reads (--stage lm), which must have finished."""
    if not os.path.exists(path):
        raise ValueError(f'no VAE at {path}: train it first (--stage vae) or pass --vae-from '
                         'RUN_DIR')
    vk = pipeline.read_checkpoint(path, 'vae')
    if not vk.get('done'):
        raise ValueError(f"the VAE at {path} stopped at step {vk['step']}/{vk['steps']}: finish "
                         'it (--stage vae --resume) before an LM trains on its latents')
    return vk


def differences(ck, cfg, recipe, **more):
    """'field (checkpoint X, command Y)' for every config and recipe field, and every item of
    `more` (name: (checkpoint's, command's)), in which a command differs from a checkpoint, but
    those RESUME_MAY_CHANGE."""
    pairs = {**{k: (ck['config'].get(k), v) for k, v in dataclasses.asdict(cfg).items()},
             **{k: (ck['recipe'].get(k), v) for k, v in recipe.items()
                if k not in RESUME_MAY_CHANGE},
             **more}
    same = lambda a, b: a == b or (isinstance(a, (list, tuple)) and list(a) == list(b))
    return [f'{k} (checkpoint {a!r}, command {b!r})' for k, (a, b) in pairs.items()
            if not same(a, b)]


def check_resume(path, ck, cfg, recipe, **more):
    """A one-line ValueError naming every difference between the command (cfg, recipe, more) and
    the checkpoint ck at path that --resume continues. A finished VAE may not change its budget."""
    finished = {'steps': (ck['recipe']['steps'], recipe['steps'])} if ck.get('done') else {}
    why = ' (a finished VAE: its latents are cached, so not even its budget)' if finished else ''
    diff = differences(ck, cfg, recipe, **more, **finished)
    if diff:
        raise ValueError(f"--resume: the command differs from {path} in {'; '.join(diff)}; a "
                         f"resumed run may change its step budget only{why}: repeat the run's "
                         'command, or use another --out')
