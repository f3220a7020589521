"""
A mutation check of the test suite: deliberate bugs of the kinds a reimplementation makes (an
off-by-one shift, a wrong sign, a missing sqrt, swapped cos and sin, a missing stop-gradient, a
wrong axis, a mask or schedule gone wrong, a temperature ignored), each applied alone to a copy of
the repository, where the tests named with it must fail. The score and every surviving mutant are
in docs/testing.md. A tool to run after changing the tests or the method files, not part of CI.

    python -m bench.mutants                      # all of them, 2 at a time (~1 h on 2 CPU cores)
    python -m bench.mutants --list               # names, and the tests each one runs
    python -m bench.mutants --only rq. vae.kl    # those whose name starts with one of these
    python -m bench.mutants --json out/mutants.json

A mutant is killed when its tests fail (exit status 1), survives when they pass; a mutant that
makes pytest itself error, or time out, is reported as such (counted as killed: CI would fail); one
whose text is no longer in its file (edited while the check ran) is 'stale', not scored.
Mutants marked `equivalent` change the code but not what it computes: they cannot be killed and
are reported apart from the score. Every mutant's `old` text must occur exactly once in its file
(checked before anything runs), so a change to the code that moves it is noticed, not skipped.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Mutant:
    name: str          # 'file.place: what' (--only matches its start)
    path: str          # the file it changes, relative to the repository root
    old: str           # text that occurs exactly once in the file ...
    new: str           # ... and what it becomes
    tests: tuple       # pytest arguments: the part of the default suite that must catch it
    equivalent: str = ''   # why it cannot change behaviour (then it is not scored)


# The parts of the default suite each file's mutants run (in this order; pytest stops at the first
# failure, so a killed mutant costs little). train.py's: the tests of its loop, not its plumbing.
CALM = ('tests/test_calm.py', 'tests/test_learn.py', 'tests/test_cond.py')
RQ = ('tests/test_rq.py', 'tests/test_learn.py')
VAE = ('tests/test_vae.py',)
TRAIN = tuple(f'tests/test_train.py::test_{t}' for t in (
    'lr_schedule_warmup_cosine_and_floor', 'the_optimizer_steps_at_the_scheduled_lr',
    'sct_phase_trains_at_a_fraction_of_the_lr', 'resume_equals_uninterrupted')) + (
    'tests/test_learn.py',)
EVAL = ('tests/test_evaluate.py',)
SAMPLE = ('tests/test_train.py', 'tests/test_errors.py', 'tests/test_cond.py')
ERRORS = ('tests/test_errors.py',)

MUTANTS = [
    # --- transformer.py, and calm.py's short-context windows ------------------------------------
    Mutant('transformer.rope: cos and sin swapped', 'transformer.py',
           'torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos)',
           'torch.stack((x1 * sin - x2 * cos, x1 * cos + x2 * sin)', CALM),
    Mutant('transformer.rope: one sign wrong (not a rotation)', 'transformer.py',
           'torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos)',
           'torch.stack((x1 * cos + x2 * sin, x1 * sin + x2 * cos)', CALM),
    Mutant('transformer.Attention: RoPE frequencies over every dim, not pairs', 'transformer.py',
           '10000 ** (torch.arange(0, self.hd, 2).float() / self.hd)',
           '10000 ** (torch.arange(0, self.hd // 2).float() / self.hd)', CALM),
    Mutant('transformer.Attention: band mask one position too wide', 'transformer.py',
           '(i[None, :] > i[:, None] - self.window)', '(i[None, :] >= i[:, None] - self.window)',
           CALM),
    Mutant('transformer.Attention.step: ring-buffer slot off by one', 'transformer.py',
           'slot = pos % self.window', 'slot = (pos + 1) % self.window', CALM),
    Mutant('transformer.Transformer: inputs not shifted (x_s reads itself)', 'transformer.py',
           'h = torch.cat([self.start.expand(B, 1, -1), self.inp(x[:, :-1])], dim=1)',
           'h = self.inp(x)', CALM),
    Mutant('transformer.Transformer.step: position never advances', 'transformer.py',
           "cache['pos'] += 1", "cache['pos'] += 0", CALM),
    Mutant('calm.short_windows: receptive field one frame too long', 'calm.py',
           'return [1 + e for e in extra][::-1]', 'return [2 + e for e in extra][::-1]', CALM),
    # --- calm.py: TrigFlow, sCT and the samplers --------------------------------------------------
    Mutant('calm.trigflow_interp: velocity sign', 'calm.py',
           'cos * noise - sin * x0', 'cos * noise + sin * x0', CALM),
    Mutant('calm.consistency_fn: sign of the F term', 'calm.py',
           't.cos()[:, None] * xt - t.sin()[:, None] * sigma_d * Fn',
           't.cos()[:, None] * xt + t.sin()[:, None] * sigma_d * Fn', CALM),
    Mutant('calm.sct_tangent: tangent warmup r ignored', 'calm.py',
           '- r * (cs * xt + sigma_d * dF_cs)', '- (cs * xt + sigma_d * dF_cs)', CALM),
    Mutant('calm.sct_tangent: JVP tangent not scaled by cos t sin t', 'calm.py',
           '(cs * dxt / sigma_d, cs[:, 0])', '(dxt / sigma_d, cs[:, 0])', CALM),
    Mutant('calm.sct_tangent: no stop-gradient on F^- and g', 'calm.py',
           '    with torch.no_grad():\n        F_minus, dF_cs',
           '    if True:\n        F_minus, dF_cs',
           CALM),
    Mutant('calm.sct_error: tangent normalised by its own norm (sCM), not the probe', 'calm.py',
           'g / (g_u.norm(dim=-1, keepdim=True) + 0.1)', 'g / (g.norm(dim=-1, keepdim=True) + 0.1)',
           CALM),
    # Once equivalent (F^- and g are computed under no_grad either way); since sct_head_only the
    # same detached z is the one the head-alone sCT loss sees, so it must be caught.
    Mutant('calm.sct_error: z not detached for theta^- (nor for sct_head_only)', 'calm.py',
           'zd = z.detach()', 'zd = z', CALM),
    Mutant('calm.objective: M copies of z tiled, x_0 interleaved (rows mispaired)', 'calm.py',
           'z, x0 = z.repeat_interleave(M, 0), x0.repeat_interleave(M, 0)',
           'z, x0 = z.repeat(M, 1), x0.repeat_interleave(M, 0)', CALM),
    Mutant('calm.objective: adaptive weight sign', 'calm.py',
           'err = w.exp() * err - w', 'err = w.exp() * err + w', CALM),
    Mutant('calm.sample_t: log sigma used as sigma (exp missing)', 'calm.py',
           'torch.atan(log_sigma.exp() / self.cfg.sigma_d)',
           'torch.atan(log_sigma / self.cfg.sigma_d)',
           CALM),
    Mutant('calm.noise_augment: sqrt missing on the noise', 'calm.py',
           'return k.sqrt() * torch.randn_like(x) + (1 - k).sqrt() * x',
           'return k * torch.randn_like(x) + (1 - k).sqrt() * x', CALM),
    Mutant('calm.noise_augment: one level per sequence, not per frame', 'calm.py',
           'torch.rand(x.shape[0], x.shape[1], 1, device=x.device)',
           'torch.rand(x.shape[0], 1, 1, device=x.device)', CALM),
    Mutant('calm.forward: noise augmentation also at evaluation', 'calm.py',
           'if (self.training and self.cfg.noise_aug) else x',
           'if self.cfg.noise_aug else x', CALM),
    Mutant('calm.consistency_sample: sqrt missing on the temperature', 'calm.py',
           'std = math.sqrt(temperature) * sigma_d', 'std = temperature * sigma_d', CALM),
    Mutant('calm.consistency_sample: re-noising with cos and sin swapped', 'calm.py',
           'math.cos(t) * x0 + math.sin(t) * noise',
           'math.sin(t) * x0 + math.cos(t) * noise', CALM),
    Mutant('calm.trigflow_sample: DDIM step sign', 'calm.py',
           'math.cos(t - s) * x - math.sin(t - s) * sigma_d',
           'math.cos(t - s) * x + math.sin(t - s) * sigma_d',
           CALM),
    Mutant('calm.Head: time embedding dropped', 'calm.py',
           'c = self.time(tf(t)) + self.cond(z)', 'c = self.cond(z)', CALM),
    Mutant('calm.generate: prompt prefill off by one', 'calm.py',
           '                self.step_backbone(x, state)\n                x = prompt[:, p]',
           '                x = prompt[:, p]\n                self.step_backbone(x, state)', CALM),
    Mutant('calm.generate: temperature ignored', 'calm.py',
           'self.step_backbone(x, state), steps, temperature, generator)',
           'self.step_backbone(x, state), steps, self.cfg.temperature, generator)', CALM),
    Mutant('calm.condition: padding mask inverted', 'calm.py',
           '(text != self.cfg.n_text)[..., None]', '(text == self.cfg.n_text)[..., None]', CALM),
    Mutant('calm.step_backbone: guidance interpolates the wrong way', 'calm.py',
           "torch.lerp(self.long.step(x_prev, state['long_null']), z, alpha)",
           "torch.lerp(z, self.long.step(x_prev, state['long_null']), alpha)", CALM),
    # --- rq.py ----------------------------------------------------------------------------------
    Mutant('rq.kmeans: 0 iterations (once missed)', 'rq.py',
           'for _ in range(iters):', 'for _ in range(0):', RQ),
    Mutant('rq.kmeans: centroid is the sum, not the mean', 'rq.py',
           'sums / counts.clamp_min(1)[:, None]', 'sums', RQ),
    Mutant('rq.nearest: sign of the cross term', 'rq.py',
           'codebook.T, alpha=-2)', 'codebook.T, alpha=2)', RQ),
    Mutant('rq.RVQ.encode: residual not updated', 'rq.py',
           '                r = r - self.codebooks[q][idx]', '                r = r', RQ),
    Mutant('rq.RVQ.ema_update: decay and its complement swapped', 'rq.py',
           'self.embed_sum[q].mul_(self.decay).add_(sums, alpha=1 - self.decay)',
           'self.embed_sum[q].mul_(1 - self.decay).add_(sums, alpha=self.decay)', RQ),
    Mutant('rq.RVQ.forward: straight-through estimator missing', 'rq.py',
           'return x + (x_q - x).detach(), torch.stack', 'return x_q, torch.stack', RQ),
    Mutant('rq.RVQ.forward: commitment loss detached from x', 'rq.py',
           'F.mse_loss(r, e.detach())', 'F.mse_loss(r.detach(), e.detach())', RQ),
    Mutant('rq.DepthTransformer: level k reads its own code', 'rq.py',
           'h = h + F.pad(prev, (0, 0, 1, 0))', 'h = h + F.pad(prev, (0, 0, 0, 1))', RQ),
    Mutant("rq.RQTransformer.forward: targets are the previous frame's codes (once missed)",
           'rq.py',
           "codes.flatten(), reduction='none')", "codes.roll(1, 1).flatten(), reduction='none')",
           RQ),
    Mutant('rq.RQTransformer.sample_head: temperature ignored (once missed)', 'rq.py',
           'self.depth.step(z, code, k, cache), temperature, top_k',
           'self.depth.step(z, code, k, cache), self.cfg.temperature, top_k', RQ),
    Mutant('rq.RQTransformer.held_out: decodes all-zero codes (once missed)', 'rq.py',
           'pred = self.rvq.decode(self.sample_head(z.flatten(0, 1), temperature=0.0)).view_as(x)',
           'pred = self.rvq.decode(torch.zeros_like(codes)).view_as(x)', RQ),
    Mutant('rq.DelayLM.forward: targets shifted by one step (once missed)', 'rq.py',
           'ce = F.cross_entropy(self.logits(d, c).flatten(0, 2).float(), d.flatten(), '
           'ignore_index=V)',
           'ce = F.cross_entropy(self.logits(d, c)[:, :-1].flatten(0, 2).float(), '
           'd[:, 1:].flatten(), ignore_index=V)', RQ),
    Mutant('rq.DelayLM.sample_head: temperature ignored', 'rq.py',
           'return sample_logits(logits, temperature, top_k, generator)',
           'return sample_logits(logits, self.cfg.temperature, top_k, generator)', RQ),
    Mutant('rq.delay: levels in reverse order', 'rq.py',
           'out[:, q:q + S, q] = codes[:, :, q]',
           'out[:, q:q + S, q] = codes[:, :, Q - 1 - q]', RQ),
    Mutant('rq.DelayLM.generate_codes: first new frame kept as a prompt frame', 'rq.py',
           'row = torch.where(frame[t] >= P, new, row)',
           'row = torch.where(frame[t] > P, new, row)',
           RQ),
    Mutant('rq.DelayLM.held_out: argmax frames one step late', 'rq.py',
           'pred = undelay(logits.argmax(-1))',
           'pred = undelay(logits.argmax(-1).roll(-1, 1))', RQ),
    Mutant('rq.sample_logits: temperature multiplies the logits', 'rq.py',
           'logits = logits.float() / temperature', 'logits = logits.float() * temperature', RQ),
    Mutant('rq.sample_logits: top-k keeps k - 1 codes', 'rq.py',
           'logits.topk(min(top_k, logits.shape[-1]), dim=-1)',
           'logits.topk(max(1, min(top_k, logits.shape[-1]) - 1), dim=-1)', RQ),
    # --- vae.py ---------------------------------------------------------------------------------
    Mutant('vae.kl_divergence: variance where log-variance belongs', 'vae.py',
           'mu.pow(2) + logvar.exp() - 1.0 - logvar',
           'mu.pow(2) + logvar - 1.0 - logvar.exp()', VAE),
    Mutant('vae.kl_divergence: mean over dims, not sum', 'vae.py',
           '- 1.0 - logvar).sum(-1).mean()', '- 1.0 - logvar).mean()', VAE),
    Mutant('vae.forward: reparameterised with the variance as std', 'vae.py',
           'torch.randn_like(mu) * (0.5 * logvar).exp()',
           'torch.randn_like(mu) * logvar.exp()', VAE),
    Mutant('vae.forward: no sampling (posterior mean decoded)', 'vae.py',
           'z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()', 'z = mu + 0 * logvar', VAE),
    Mutant('vae.forward: KL subtracted', 'vae.py',
           'reg, reg_stats = cfg.kl_weight * l_kl,',
           'reg, reg_stats = -cfg.kl_weight * l_kl,', VAE),
    Mutant('vae.stft_loss: magnitudes not logged', 'vae.py',
           '(torch.log(X + 1e-2) - torch.log(Y + 1e-2)).abs().mean()', '(X - Y).abs().mean()', VAE),
    Mutant('vae.CausalConv1d: padded on the right (non-causal)', 'vae.py',
           'super().forward(F.pad(x, (pad, 0)))', 'super().forward(F.pad(x, (0, pad)))', VAE),
    Mutant('vae.CausalConvTranspose1d: trimmed on the left', 'vae.py',
           'y[..., :y.shape[-1] - trim] if trim > 0 else y',
           'y[..., trim:] if trim > 0 else y', VAE),
    Mutant('vae.set_latent_stats: variance as std', 'vae.py',
           'x.std(0).clamp_min(1e-3)', 'x.var(0).clamp_min(1e-3)', VAE),
    # --- train.py: schedule and loop --------------------------------------------------------------
    Mutant('train.lr_schedule: warmup starts at lr 0 and ends a step late', 'train.py',
           "return lr * (s + 1) / recipe['warmup']", "return lr * s / recipe['warmup']", TRAIN),
    Mutant('train.lr_schedule: no 10% floor', 'train.py',
           'lr * (0.1 + 0.9 * 0.5 * (1 + math.cos', 'lr * (0.0 + 1.0 * 0.5 * (1 + math.cos', TRAIN),
    Mutant('train.lr_schedule: sCT lr from one step late', 'train.py',
           "if s >= sct_from else 1.0", "if s > sct_from else 1.0", TRAIN),
    Mutant('train.train: gradients never zeroed', 'train.py',
           '            opt.zero_grad(set_to_none=True)\n', '', TRAIN),
    Mutant('train.train: optimizer lr not set from the schedule', 'train.py',
           "g['lr'] = lr_at(step)", "g['lr'] = recipe['lr']", TRAIN),
    Mutant('runs.resume: torch RNG state not restored', 'runs.py',
           "    torch.set_rng_state(ck['rng']['torch'])\n", '', TRAIN),
    Mutant('runs.save: checkpoint records the next step', 'runs.py',
           "'step': step, 'steps': steps, 'rng': rng",
           "'step': step + 1, 'steps': steps, 'rng': rng",
           TRAIN),
    # --- metrics.py / evaluate.py ---------------------------------------------------------------
    Mutant('metrics.frechet: cross term added', 'metrics.py',
           '- 2 * np.sqrt(np.maximum(cross, 0)).sum())',
           '+ 2 * np.sqrt(np.maximum(cross, 0)).sum())',
           EVAL),
    Mutant('metrics.si_sdr: ratio inverted', 'metrics.py',
           '10 * np.log10((target @ target + eps) / ((e - target) @ (e - target) + eps))',
           '10 * np.log10(((e - target) @ (e - target) + eps) / (target @ target + eps))',
           ('tests/test_data.py', 'tests/test_vae.py', 'tests/test_evaluate.py')),
    Mutant('evaluate.eval_speed: head cost per step over 100 steps, not 99', 'evaluate.py',
           "out['ms_per_frame_steps1']) / 99", "out['ms_per_frame_steps1']) / 100", EVAL),
    Mutant('evaluate.compare_rows: reference rows from the last variant', 'evaluate.py',
           "first = next(iter(results.values()))['continuation']['rows']",
           "first = list(results.values())[-1]['continuation']['rows']", EVAL),
    # --- sample.py / pipeline.py ----------------------------------------------------------------
    Mutant('sample.main: --temperature not passed to the model', 'sample.py',
           "kwargs = {} if args.temperature is None else {'temperature': args.temperature}",
           'kwargs = {}', SAMPLE),
    Mutant('sample.main: the seed does not reach the generator', 'sample.py',
           'gen = torch.Generator(args.device).manual_seed(args.seed)',
           'gen = torch.Generator(args.device).manual_seed(0)', SAMPLE),
    # --- errors that lose nothing ---------------------------------------------------------------
    Mutant('train.main: inputs checked after the run folder is made', 'train.py',
           '    check_inputs(args)   # before anything is written: a command that fails leaves no '
           'run folder\n    os.makedirs(args.out, exist_ok=True)\n',
           '    os.makedirs(args.out, exist_ok=True)\n    check_inputs(args)\n', ERRORS),
    Mutant('runs.differences: the recipe not compared on --resume', 'runs.py',
           "**{k: (ck['recipe'].get(k), v) for k, v in recipe.items()",
           "**{k: (v, v) for k, v in recipe.items()", ERRORS),
    Mutant('pipeline.read_checkpoint: vae.pt and calm.pt not told apart', 'pipeline.py',
           'if holds != what:', 'if False:', ERRORS),
    Mutant('sample.main: Ctrl-C drops the frames generated', 'sample.py',
           '            new = torch.stack(frames, 1)\n', '            raise\n', ERRORS),
]


def check(mutants):
    """Every mutant's old text occurs exactly once in its file (else the code moved: fix the list).
    """
    bad = []
    for m in mutants:
        with open(os.path.join(ROOT, m.path)) as f:
            n = f.read().count(m.old)
        if n != 1:
            bad.append(f'{m.name}: its old text occurs {n} times in {m.path}')
    if bad:
        raise SystemExit('error: ' + '; '.join(bad))


def copy_repo(dst):
    """The repository's files as git sees them (tracked and untracked, not ignored) under dst."""
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split('\0')
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def run_one(m, timeout):
    """Apply m to a fresh copy, run its tests; returns (outcome, seconds, last lines of output)."""
    with tempfile.TemporaryDirectory(prefix='mutant-') as tmp:
        copy_repo(tmp)
        if m is not None:
            path = os.path.join(tmp, m.path)
            with open(path) as f:
                text = f.read()
            if text.count(m.old) != 1:   # the file changed since check(): nothing to mutate
                return 'stale', 0.0, f'its old text occurs {text.count(m.old)} times in {m.path}'
            with open(path, 'w') as f:
                f.write(text.replace(m.old, m.new))
        tests = m.tests if m is not None else tuple(sorted({t for x in MUTANTS for t in x.tests}))
        cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests]
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
        t0 = time.time()
        try:
            r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return 'timeout', time.time() - t0, ''
        outcome = {0: 'survived', 1: 'killed'}.get(r.returncode,
                                                   f'error (pytest rc {r.returncode})')
        tail = [line for line in r.stdout.splitlines() if line.startswith(('FAILED', 'ERROR'))]
        return outcome, time.time() - t0, (tail[0] if tail else r.stdout.strip()[-300:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--only', nargs='+', help='run the mutants whose name starts with one of these')
    p.add_argument('--list', action='store_true', help='list the mutants and their tests')
    p.add_argument('--jobs', type=int, default=2, help='mutants run at once (default 2)')
    p.add_argument('--timeout', type=float, default=900, help='seconds per mutant (default 900)')
    p.add_argument('--skip-baseline', action='store_true',
                   help='do not first check that the unmutated copy passes all the tests used')
    p.add_argument('--json', help='also write the results to this file')
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name.startswith(tuple(args.only))]
    if not mutants:
        raise SystemExit(f'error: no mutant name starts with {" or ".join(args.only)} (--list)')
    check(mutants)
    if args.list:
        for m in mutants:
            eq = '  [equivalent]' if m.equivalent else ''
            print(f'{m.name}{eq}\n    {" ".join(m.tests)}')
        return
    if not args.skip_baseline:
        outcome, secs, tail = run_one(None, 2 * args.timeout)
        print(f'baseline (no mutant): {outcome} in {secs:.0f} s', flush=True)
        if outcome != 'survived':
            raise SystemExit(f'error: the tests fail without any mutant: {tail}')
    results, t0 = [], time.time()

    def job(m):
        outcome, secs, tail = run_one(m, args.timeout)
        results.append(dict(name=m.name, outcome=outcome, seconds=round(secs, 1), detail=tail,
                            equivalent=m.equivalent))
        done = len(results)
        eta = (time.time() - t0) / done * (len(mutants) - done)
        print(f'[{done}/{len(mutants)}] {outcome:9s} {secs:5.0f} s  {m.name} | ETA {eta / 60:.0f} '
              f'min', flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(job, mutants))
    scored = [r for r in results if not r['equivalent'] and r['outcome'] != 'stale']
    killed = [r for r in scored if r['outcome'] != 'survived']
    n_eq = sum(1 for r in results if r['equivalent'])
    n_stale = sum(1 for r in results if r['outcome'] == 'stale')
    print(f'\nscore: {len(killed)}/{len(scored)} mutants killed ({n_eq} equivalent, '
          f'{n_stale} stale: not scored) in {(time.time() - t0) / 60:.0f} min')
    for r in sorted(results, key=lambda r: r['name']):
        if r['outcome'] == 'survived':
            why = f" (equivalent: {r['equivalent']})" if r['equivalent'] else ''
            print(f"  survived: {r['name']}{why}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump(dict(score=[len(killed), len(scored)], results=results), f, indent=1)


if __name__ == '__main__':
    main()
