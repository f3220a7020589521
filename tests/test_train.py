"""End-to-end tests of train.py and sample.py with tiny configs: the real scripts, real audio files.
"""
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import pipeline  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

# A VAE and an LM small enough to train a few steps in seconds.
TINY = ['--clips', '6', '--vae.channels=4', '--vae.n_transformer_layers=0', '--vae.latent_dim=8',
        '--lm.d_model=32', '--lm.n_layers=1', '--lm.n_heads=2', '--lm.context=12',
        '--lm.short_context=3',
        '--lm.short_layers=1', '--lm.head_width=32', '--lm.head_blocks=1', '--log-every', '1']


def train_main(argv):
    """train.main in-process, then undo its process-wide CPU flush-to-zero: hypothesis (other test
    files) refuses to generate floats when subnormals cannot be represented."""
    try:
        train.main(argv)
    finally:
        torch.set_flush_denormal(False)


def run(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def sample_in_process(run_dir, prompt, n_new, seed=0, **kw):
    """What `python sample.py PROMPT --ckpt RUN_DIR --seed SEED` should write for n_new frames,
    computed here from the library (its seeding; the prompt cut to whole frames, at most a
    context): (the audio clipped to the wav's [-1, 1], the latents [1, P + n_new, D] decoded)."""
    vae, model = pipeline.load(str(run_dir))
    wav = data.load_audio(str(prompt), vae.cfg.sample_rate)
    wav = wav[len(wav) - min(len(wav) // vae.hop, model.cfg.context) * vae.hop:]
    torch.manual_seed(seed)
    with torch.inference_mode():
        z = vae.encode(torch.from_numpy(wav)[None])
        new = model.generate(z, n_new, generator=torch.Generator().manual_seed(seed), **kw)
        z = torch.cat([z, new], 1)
        return np.clip(vae.decode(z)[0].numpy(), -1, 1), z


def sample_latents(monkeypatch, argv):
    """sample.main(argv) in this process: the latents it hands the VAE decoder (a VAE trained for
    a few steps barely hears its latents, so its audio alone cannot tell two continuations apart).
    """
    import sample
    seen, load = [], pipeline.load

    def load_and_watch(*args, **kwargs):
        vae, model = load(*args, **kwargs)
        decode = vae.decode
        monkeypatch.setattr(vae, 'decode', lambda z: (seen.append(z.clone()), decode(z))[1])
        return vae, model
    monkeypatch.setattr(pipeline, 'load', load_and_watch)
    try:
        sample.main(argv)
    finally:   # sample.main sets it process-wide; hypothesis needs subnormals
        torch.set_flush_denormal(False)
    return seen[0]


def tiny_recipes(monkeypatch):
    monkeypatch.setitem(train.RECIPES, 'vae',
                        dict(train.RECIPES['vae'], batch=2, crop=0.25, warmup=2))
    # sct_lr 0.5: the toy's is 1 (its sCT trains the head alone), but the scaling must be seen
    monkeypatch.setitem(train.RECIPES, 'lm', dict(train.RECIPES['lm'], batch=4, warmup=2,
                                                  sct_lr=0.5))


def test_pipeline_writes_loadable_checkpoints_and_logs(tiny_run):
    vae, model = pipeline.load(str(tiny_run))
    assert vae.cfg.latent_dim == model.cfg.latent_dim == 8
    records = [json.loads(line) for line in open(tiny_run / 'log.jsonl')]
    assert [r['step'] for r in records if r['stage'] == 'vae'] == [1, 2, 3, 4]
    assert [r['step'] for r in records if r['stage'] == 'lm' and 'val_mse' not in r] == [1, 2, 3, 4]
    # held-out check at the end (ckpt-every 100)
    assert [r['step'] for r in records if 'val_mse' in r] == [4]
    assert all(np.isfinite(r['loss']) for r in records)
    # the latent cache the LM trained on is the saved VAE's encoding of the clips (toy clip 0 is
    # the first source)
    meta = json.load(open(tiny_run / 'latents.json'))
    lat = np.load(tiny_run / 'latents.npy', mmap_mode='r')
    a, n = meta['starts'][0], meta['lengths'][0]
    wav = data.make_clip(data.clip_seed('train', 0), train.TOY_CLIPS['seconds']).wav
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(wav)[None])[0].numpy()
    assert z.shape == (n, 8) and np.abs(lat[a:a + n] - z).max() < 1e-4
    # the VAE checkpoint carries the latent statistics the LM was trained with
    assert not torch.allclose(vae.latent_std, torch.ones_like(vae.latent_std))


def test_sct_phase_trains_at_a_fraction_of_the_lr(tiny_run):
    # tiny run: 4 LM steps, diffusion_steps 3, so step index 3 (logged as step 4) is sCT
    recs = map(json.loads, open(tiny_run / 'log.jsonl'))
    recs = {r['step']: r for r in recs if r['stage'] == 'lm' and 'lr' in r}
    recipe = json.load(open(tiny_run / 'config.json'))['lm']['recipe']   # tiny_recipes' sct_lr
    lr, mult = recipe['lr'], recipe['sct_lr']
    assert mult == 0.5
    assert 'g_norm' not in recs[3] and 'g_norm' in recs[4]
    # warmup 2 done, cosine at its start
    assert recs[3]['lr'] == pytest.approx(lr)
    # cosine half way, times sct_lr
    assert recs[4]['lr'] == pytest.approx(mult * lr * (0.1 + 0.9 * 0.5))


def test_sct_from_scratch_keeps_the_full_lr(tiny_run, tmp_path, monkeypatch, capsys):
    tiny_recipes(monkeypatch)
    train_main(['--stage', 'lm', '--vae-from', str(tiny_run), '--out', str(tmp_path), '--lm-steps',
                '4', '--lm.diffusion_steps=0', *TINY])
    # the run says at its start which recipe it took and why, and records it
    out = capsys.readouterr().out
    assert "lm recipe: 4 steps x 4 windows: train.RECIPES['lm'] because the device is cpu" in out
    assert '--lm-steps 4' in out and '--lm.diffusion_steps=0' in out and 'vae recipe' not in out
    run = json.load(open(tmp_path / 'config.json'))
    assert set(run) >= {'args', 'lm'} and 'vae' not in run
    assert run['lm']['config']['diffusion_steps'] == 0 and run['lm']['recipe']['steps'] == 4
    recs = {r['step']: r for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'lr' in r}
    assert 'g_norm' in recs[1]                                          # sCT from the first step
    assert recs[4]['lr'] == pytest.approx(train.RECIPES['lm']['lr'] * (0.1 + 0.9 * 0.5))


def test_config_json_records_what_the_run_trained(tiny_run):
    run = json.load(open(tiny_run / 'config.json'))
    vae, model = pipeline.load(str(tiny_run))
    # tuples read back as lists
    assert run['vae']['config'] == json.loads(json.dumps(dataclasses.asdict(vae.cfg)))
    assert run['lm']['config'] == dataclasses.asdict(model.cfg)
    assert run['vae']['recipe']['steps'] == run['lm']['recipe']['steps'] == 4
    assert run['args']['device'] == 'cpu' and run['world_size'] == 1
    assert '--vae-steps 4' in run['vae']['why'] and '--lm.d_model=32' in run['lm']['why']
    assert not os.path.exists(tiny_run / 'config.json.tmp')


@pytest.mark.parametrize('objective, diffusion_steps', [('trigflow', 0), ('consistency', 0),
                                                       ('consistency', 40)])
def test_lr_schedule_warmup_cosine_and_floor(objective, diffusion_steps):
    """nanoGPT's schedule: lr (s + 1) / warmup for the first `warmup` steps (never 0, reaching lr at
    the last warmup step), then a cosine from lr down to a floor of 10% at the last step, never
    below it after; a consistency run with a TrigFlow phase trains its sCT steps (from
    diffusion_steps on) at sct_lr x that."""
    recipe = dict(lr=2e-3, warmup=10, sct_lr=0.1)
    cfg = train.calm.Config(head_loss=objective, diffusion_steps=diffusion_steps)
    lr_at = train.lr_schedule(recipe, 100, cfg)
    sct = lambda s: 0.1 if diffusion_steps and s >= diffusion_steps else 1.0
    assert [lr_at(s) for s in range(10)] == pytest.approx([2e-4 * (s + 1) for s in range(10)])
    assert lr_at(10) == pytest.approx(2e-3)
    assert lr_at(55) == pytest.approx(sct(55) * 2e-3 * 0.55)              # half way: (1 + 0.1) / 2
    assert lr_at(100) == pytest.approx(sct(100) * 2e-4)
    assert lr_at(500) == pytest.approx(sct(500) * 2e-4)                   # past the end: the floor
    after = [lr_at(s) / sct(s) for s in range(10, 101)]
    assert all(a > b for a, b in zip(after, after[1:]))                   # decreasing
    if diffusion_steps:
        assert lr_at(40) == pytest.approx(0.1 * 2e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi / 3))))
        assert lr_at(39) == pytest.approx(2e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 29 / 90))))


def test_the_optimizer_steps_at_the_scheduled_lr(tmp_path, monkeypatch):
    """train.train sets every step's lr from the schedule before the optimizer steps (the logged lr
    is computed apart, so it would not show a loop that forgot to set it)."""
    seen = []
    make = train.make_optimizer

    def recording(stage, model, recipe):
        opt = make(stage, model, recipe)
        step = opt.step
        opt.step = lambda: (seen.append([g['lr'] for g in opt.param_groups]), step())[1]
        return opt
    monkeypatch.setattr(train, 'make_optimizer', recording)
    model = train.calm.CALM(train.calm.Config(latent_dim=2, d_model=8, n_layers=1, n_heads=1,
                                              context=4, short_context=0, head_width=8,
                                              head_blocks=1, head_loss='trigflow'))
    recipe = dict(steps=12, batch=2, lr=1e-3, warmup=3, wd=0.0)
    args = train.parse_args(['--out', str(tmp_path), '--log-every', '100'])
    train.train('lm', model, model.cfg, recipe, lambda s: torch.randn(2, 4, 2),
                str(tmp_path / 'c.pt'), args, False, runs.Log(str(tmp_path), False))
    lr_at = train.lr_schedule(recipe, 12, model.cfg)
    assert seen == [[pytest.approx(lr_at(s))] * 2 for s in range(12)]


def test_recipe_reason_names_the_device_and_the_flags():
    why = lambda stage, *a: train.recipe_reason(stage, train.parse_args(list(a)))
    gpu, cpu = train.GPU_LM, train.RECIPES['lm']
    assert why('lm', '--device', 'cpu').startswith(
        f"{cpu['steps']} steps x {cpu['batch']} windows: train.RECIPES['lm']")
    assert why('lm', '--device', 'cuda').startswith(
        f"{gpu['steps']} steps x {gpu['batch']} windows: train.GPU_LM")
    assert why('lm', '--device', 'cuda', '--lm-batch', '8').startswith(
        f"{gpu['steps']} steps x 8 windows")
    assert why('vae', '--device', 'cuda', '--vae-steps', '7') == (
        f"7 steps x {train.RECIPES['vae']['batch']} crops: train.RECIPES['vae'] "
        "(the same on every device), --vae-steps 7")


def test_lm_recipe_takes_the_gpu_budget_on_cuda_and_flags_win():
    toy, base = train.calm.TOY, train.RECIPES['lm']
    cpu, cfg = train.lm_recipe(train.parse_args(['--device', 'cpu']), toy)
    assert (cpu['steps'], cpu['batch']) == (base['steps'], base['batch'])
    assert cfg.diffusion_steps == toy.diffusion_steps
    gpu, cfg = train.lm_recipe(train.parse_args(['--device', 'cuda:0']), toy)
    gpu_budget = (train.GPU_LM['steps'], train.GPU_LM['batch'])
    assert (gpu['steps'], gpu['batch']) == gpu_budget != (base['steps'], base['batch'])
    # 8100 of 9000
    assert cfg.diffusion_steps == round(toy.diffusion_steps * gpu['steps'] / base['steps'])
    args = train.parse_args(['--device', 'cuda', '--lm-steps', str(base['steps'] // 2),
                             '--lm-batch', '8'])
    own, cfg = train.lm_recipe(args, toy)   # half the CPU steps: half the TrigFlow phase
    assert ((own['steps'], own['batch'], cfg.diffusion_steps)
            == (base['steps'] // 2, 8, toy.diffusion_steps // 2))
    # an explicit TrigFlow phase is kept
    args = train.parse_args(['--device', 'cuda', '--lm.diffusion_steps=7'])
    assert train.lm_recipe(args, train.override(toy, args.overrides['lm']))[1].diffusion_steps == 7
    assert 'window' not in cpu   # the window is the context unless asked for
    args = train.parse_args(['--lm-window', '96', '--lm-lr', '1e-3', '--lm-sct-lr', '1'])
    own = train.lm_recipe(args, toy)[0]
    assert (own['window'], own['lr'], own['sct_lr']) == (96, 1e-3, 1)
    assert '--lm-window 96, --lm-lr 0.001, --lm-sct-lr 1' in train.recipe_reason('lm', args)


def test_lm_window_longer_than_the_context(tiny_run, tmp_path, monkeypatch, capsys):
    """--lm-window 20 over a context of 12: training windows reach the sliding attention; a window
    longer than a toy LM clip, or a clip of no length, is a one-line error."""
    tiny_recipes(monkeypatch)
    common = ['--stage', 'lm', '--vae-from', str(tiny_run), '--lm-steps', '2', *TINY]
    train_main(['--out', str(tmp_path / 'w'), '--lm-window', '20', *common])
    out = capsys.readouterr().out
    assert 'x 20 frames (context 12)' in out and 'LM clips encoded' in out   # the stages' times
    run = json.load(open(tmp_path / 'w' / 'config.json'))
    assert run['lm']['recipe']['window'] == 20 and '--lm-window 20' in run['lm']['why']
    for bad, msg in (['--lm-window', '500'], '--lm-window 500'), (['--lm-seconds', '0'], '> 0'):
        with pytest.raises(SystemExit, match=msg):
            train_main(['--out', str(tmp_path / 'x'), *bad, *common])
        assert not (tmp_path / 'x' / 'config.json').exists()   # checked before anything is written


def test_sample_end_to_end(tiny_run, tmp_path, monkeypatch):
    prompt = tmp_path / 'prompt.flac'  # another format and rate than the model's, and stereo
    t = np.arange(int(0.5 * 44100)) / 44100
    sf.write(prompt, np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2, 1), 44100)
    out = tmp_path / 'cont.wav'
    argv = [str(prompt), '--ckpt', str(tiny_run), '--seconds', '1', '--seed', '3',
            '--temperature', '0.5']
    r = run('sample.py', *argv, '--out', str(out))
    assert 'real-time factor' in r.stdout
    wav, sr = sf.read(out)
    vae, _ = pipeline.load(str(tiny_run))
    assert sr == vae.cfg.sample_rate
    n_prompt, n_new = int(0.5 * sr) // vae.hop, round(1 * vae.frame_rate)
    assert len(wav) == (n_prompt + n_new) * vae.hop
    # the prompt as the VAE reconstructs it, then the model's continuation with that seed and
    # temperature: the script feeds the library what it should (the wav up to its 16 bits; the
    # latents exactly)
    ref, z = sample_in_process(tiny_run, prompt, n_new, seed=3, temperature=0.5)
    assert np.abs(wav - ref).max() < 1e-4
    seen = sample_latents(monkeypatch, [*argv, '--out', str(tmp_path / 'again.wav')])
    assert seen.shape == (1, n_prompt + n_new, vae.cfg.latent_dim)
    assert torch.allclose(seen, z, atol=1e-5)
    for other in (dict(seed=4, temperature=0.5), dict(seed=3, temperature=0.8)):
        assert not torch.allclose(seen, sample_in_process(tiny_run, prompt, n_new, **other)[1],
                                  atol=1e-3), other


def test_data_prompt_then_sample(tiny_run, tmp_path):
    """The README's first steps: `python data.py prompt PATH` writes held-out clip 0, `python
    sample.py PATH` continues it beside the prompt."""
    prompt = tmp_path / 'prompt.wav'
    r = run('data.py', 'prompt', str(prompt), '--seconds', '2')
    assert 'sample.py' in r.stdout
    wav, sr = sf.read(prompt)
    ref = data.make_clip(data.clip_seed('heldout', 0), 2.0).wav
    assert sr == data.SR and len(wav) == len(ref)
    # the clip itself, up to 16-bit rounding
    assert np.abs(wav - ref).max() < 1e-4
    run('sample.py', str(prompt), '--ckpt', str(tiny_run), '--seconds', '1')
    assert sf.info(tmp_path / 'prompt_calm.wav').frames > len(ref) // 2
    r = run('data.py', 'prompt', str(tmp_path / 'bad.wav'), '--clip', '-1', check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ['error: clip index out of range: -1']
    assert not list(tmp_path.glob('bad*'))


@pytest.mark.parametrize('kind', ['missing', 'directory', 'empty', 'garbage', 'nan', 'too_short'])
def test_sample_bad_inputs_fail_cleanly(tiny_run, tmp_path, kind):
    path = tmp_path / f'{kind}.wav'
    if kind == 'directory':
        path.mkdir()
    elif kind == 'empty':
        sf.write(path, np.zeros(0), 24000)
    elif kind == 'garbage':
        path.write_bytes(b'not audio at all' * 10)
    elif kind == 'nan':
        sf.write(path, np.full(24000, np.nan), 24000, subtype='FLOAT')
    elif kind == 'too_short':
        sf.write(path, 0.1 * np.ones(100), 24000)
    out = tmp_path / 'out.wav'
    r = run('sample.py', str(path), '--ckpt', str(tiny_run), '--out', str(out), check=False)
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not list(tmp_path.glob('*.tmp*'))


def test_sample_never_overwrites_the_prompt(tiny_run, tmp_path):
    prompt = tmp_path / 'p.wav'
    sf.write(prompt, 0.1 * np.random.default_rng(0).standard_normal(24000), 24000)
    before = prompt.read_bytes()
    r = run('sample.py', str(prompt), '--ckpt', str(tiny_run), '--out', str(prompt), check=False)
    assert r.returncode != 0 and prompt.read_bytes() == before


def test_smoke_help_of_every_script():
    for script in ('train.py', 'sample.py', 'data.py'):
        assert 'usage' in run(script, '--help').stdout


@pytest.mark.parametrize('head', [[], ['--head-loss', 'lsd']], ids=['consistency', 'lsd'])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, head):
    """An interrupted and resumed run ends with exactly the weights of an uninterrupted one (the
    default head, and an LSD head)."""
    tiny_recipes(monkeypatch)
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    common = ['--toy', '--vae-steps', '3', '--lm-steps', '5', '--ckpt-every', '1', *head, *TINY]
    train_main(['--out', str(full), *common])
    # stops inside the VAE stage
    train_main(['--out', str(cut), '--stop-after', '2', *common])
    # VAE done, LM stops at 2
    train_main(['--out', str(cut), '--stop-after', '3', '--resume', *common])
    train_main(['--out', str(cut), '--resume', *common])
    for name in ('vae.pt', 'calm.pt'):
        a = torch.load(full / name, weights_only=False)
        b = torch.load(cut / name, weights_only=False)
        assert a['step'] == b['step']
        for k in a['model']:
            assert torch.equal(a['model'][k], b['model'][k]), (name, k)


def test_lsd_run_trains_and_samples_with_no_flag(tmp_path, monkeypatch):
    """`train.py --head-loss lsd` logs both terms of its loss; sample.py reads the head loss from
    the checkpoint and continues a prompt with the flow map, 1 or 4 jumps, with no flag."""
    tiny_recipes(monkeypatch)
    train_main(['--toy', '--out', str(tmp_path), '--vae-steps', '2', '--lm-steps', '3',
                '--head-loss', 'lsd', *TINY])
    recs = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    lm = [r for r in recs if r['stage'] == 'lm' and 'lr' in r]   # the training steps
    assert len(lm) == 3 and all(np.isfinite(r['lsd_mse']) and np.isfinite(r['mse']) for r in lm)
    _, model = pipeline.load(str(tmp_path))
    assert model.cfg.head_loss == 'lsd' and model.head.time_end is not None
    prompt = tmp_path / 'prompt.wav'
    sf.write(prompt, 0.1 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000), 24000)
    for steps in ('1', '4'):
        out = tmp_path / f'cont{steps}.wav'
        run('sample.py', str(prompt), '--ckpt', str(tmp_path), '--seconds', '1', '--steps', steps,
            '--out', str(out))
        wav, _ = sf.read(out)
        assert np.isfinite(wav).all() and np.abs(wav).max() > 0


def test_ddp_replicas_stay_identical(tmp_path):
    """torchrun with 2 CPU processes (gloo): DistributedDataParallel keeps the replicas equal."""
    out = tmp_path / 'ddp'
    with socket.socket() as s:  # a free port, not a fixed one: another run on this machine may hold
                                # that
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    run('-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', 'train.py',
        '--toy', '--out', str(out), '--vae-steps', '2', '--lm-steps', '2', *TINY)
    diffs = [json.loads(line) for line in open(out / 'log.jsonl')]
    diffs = [r['replica_max_abs_diff'] for r in diffs if 'replica_max_abs_diff' in r]
    assert len(diffs) == 2 and max(diffs) == 0.0


GAN = ['--stage', 'vae', '--vae-steps', '4', '--vae.discriminator=true', '--vae.disc_channels=2',
       '--vae.disc_start=0.25', '--vae.phase=learned', '--ckpt-every', '1', *TINY]


def test_vae_gan_trains_its_discriminator_and_resumes_exactly(tmp_path, monkeypatch):
    """discriminator=True trains D from step disc_start * steps on (logged d_loss / g_adv / g_feat,
    D and its optimizer in the checkpoint), and a run interrupted after the GAN started resumes to
    the same weights. With the learned-phase head, whose phase branch only the adversarial terms
    train here."""
    tiny_recipes(monkeypatch)
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    train_main(['--out', str(full), *GAN])
    recs = [json.loads(line) for line in open(full / 'log.jsonl')]
    # GAN from step 1
    assert 'd_loss' not in recs[0]
    assert all({'d_loss', 'g_adv', 'g_feat'} <= set(r) for r in recs[1:])
    # the learned phase branch, clipped on its own
    assert all(r['grad_norm_phase'] > 0 for r in recs[1:])
    d = [r['d_loss'] for r in recs[1:]]
    assert all(np.isfinite(d)) and len(set(d)) == len(d)  # the discriminator's loss moves
    train_main(['--out', str(cut), '--stop-after', '2', *GAN])  # one step into the GAN phase
    train_main(['--out', str(cut), '--resume', *GAN])
    a, b = (torch.load(p / 'vae.pt', weights_only=False) for p in (full, cut))
    fresh = train.vae_lib.Adversary(train.vae_lib.Config(**a['config']), 0, 'cpu', False)
    fresh = fresh.disc.state_dict()
    assert any(not torch.equal(a['disc'][k], fresh[k]) for k in fresh)  # D was trained
    for key in ('model', 'disc'):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a['disc_optimizer']['state'][0]['step'] == b['disc_optimizer']['state'][0]['step'] == 3


def test_a_checkpoint_from_before_time_scale_loads_with_100(tiny_run, tmp_path):
    """calm.pt files written before Config.time_scale existed were trained with time features at 100
    rad per unit t: pipeline.load must rebuild them so, or their head would read other features than
    it learnt."""
    shutil.copy(tiny_run / 'vae.pt', tmp_path / 'vae.pt')
    ck = torch.load(tiny_run / 'calm.pt', weights_only=False)
    assert ck['config']['time_scale'] == 10.0        # what a run writes now
    del ck['config']['time_scale']
    torch.save(ck, tmp_path / 'calm.pt')
    _, old = pipeline.load(str(tmp_path))
    _, new = pipeline.load(str(tiny_run))
    assert old.cfg.time_scale == 100.0 and old.head.time_scale == 100.0
    assert new.head.time_scale == 10.0
    x, t, z = torch.randn(3, new.cfg.latent_dim), torch.rand(3), torch.randn(3, new.cfg.d_model)
    with torch.no_grad():
        # same weights, other features
        assert not torch.allclose(old.head(x, t, z), new.head(x, t, z))


def lrs(argv):
    """Every step's lr of the LM stage train.py would run with these flags (no training)."""
    args = train.parse_args(argv + ['--device', 'cpu'])
    cfg = dataclasses.replace(train.calm.TOY, **({'head_loss': args.head_loss}
                                                 if args.head_loss else {}))
    if args.model != 'calm':
        cfg = train.rq.config_like(cfg, kind=args.model)
    recipe, cfg = train.lm_recipe(args, cfg)
    at = train.lr_schedule(recipe, recipe['steps'], cfg)
    return np.array([at(s) for s in range(recipe['steps'])])


def test_every_lm_gets_the_consistency_runs_lr_schedule_by_default(monkeypatch):
    # sct_lr 0.1 so that the switch shows (the toy's is 1: its sCT trains the head alone)
    monkeypatch.setitem(train.RECIPES, 'lm', dict(train.RECIPES['lm'], sct_lr=0.1))
    calm_lr = lrs([])
    # the consistency run's shape, unchanged: cosine, x sct_lr from its sCT phase
    base, n = train.RECIPES['lm'], train.calm.TOY.diffusion_steps
    plain = lrs(['--lr-shape', 'cosine'])
    assert np.allclose(calm_lr[:n], plain[:n])
    assert np.allclose(calm_lr[n:], base['sct_lr'] * plain[n:])
    assert (np.diff(plain[base['warmup']:]) <= 0).all() and plain[-1] > 0.1 * base['lr'] * 0.99
    for model in ('rq', 'delay'):
        assert np.array_equal(lrs(['--model', model]), calm_lr)
        assert np.array_equal(lrs(['--model', model, '--lr-shape', 'cosine']), plain)
    # a TrigFlow run keeps the plain cosine unless asked; a shorter run moves the switch with it
    assert np.array_equal(lrs(['--head-loss', 'trigflow']), plain)
    assert np.array_equal(lrs(['--head-loss', 'trigflow', '--lr-shape', 'sct']), calm_lr)
    half = base['steps'] // 2
    short_calm, short_rq = lrs(['--lm-steps', str(half)]), lrs(['--model', 'rq', '--lm-steps',
                                                               str(half)])
    assert np.array_equal(short_calm, short_rq) and short_calm[n // 2 - 1] > 5 * short_calm[n // 2]
