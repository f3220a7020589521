"""Bad input to every entry point (train.py, sample.py, evaluate.py, tour.py): one line on stderr,
exit status != 0, and nothing written or overwritten. And sample.py interrupted by Ctrl-C writes
the audio it generated so far, and says so."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import ROOT, TINY, run, sample_in_process, tiny_recipes, train_main  # noqa


sys.path.insert(0, ROOT)
import pipeline  # noqa: E402
import train  # noqa: E402


def files(folder):
    """{path: bytes} of every file under folder: what a failed command must leave as it was."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(d, n), 'rb') as f:
                out[os.path.relpath(os.path.join(d, n), folder)] = f.read()
    return out


def one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith('error: '), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope='module')
def bad_runs(tiny_run, tmp_path_factory):
    """Run folders a user can point an entry point at by mistake: empty; vae.pt and calm.pt
    swapped; calm.pt cut short (a damaged download)."""
    root = tmp_path_factory.mktemp('bad_runs')
    (root / 'empty').mkdir()
    (root / 'swapped').mkdir()
    shutil.copy(tiny_run / 'vae.pt', root / 'swapped' / 'calm.pt')
    shutil.copy(tiny_run / 'calm.pt', root / 'swapped' / 'vae.pt')
    (root / 'damaged').mkdir()
    shutil.copy(tiny_run / 'vae.pt', root / 'damaged' / 'vae.pt')
    blob = (tiny_run / 'calm.pt').read_bytes()
    (root / 'damaged' / 'calm.pt').write_bytes(blob[:len(blob) // 2])
    return root


@pytest.mark.parametrize('kind, words', [('empty', ['no checkpoint']),
                                         ('swapped', ['holds the VAE', 'swapped']),
                                         ('damaged', ['not a readable checkpoint'])])
def test_pipeline_load_names_what_is_wrong_with_a_run_folder(bad_runs, kind, words):
    with pytest.raises(ValueError) as e:
        pipeline.load(str(bad_runs / kind))
    assert len(str(e.value).splitlines()) == 1
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize('script, kind', [('evaluate.py', 'empty'), ('sample.py', 'swapped'),
                                          ('tour.py', 'swapped'), ('evaluate.py', 'damaged')])
def test_entry_points_say_one_line_for_a_wrong_checkpoint(bad_runs, tmp_path, script, kind):
    if script == 'tour.py':   # without matplotlib tour.py stops before reading a checkpoint
        pytest.importorskip('matplotlib', reason='tour.py needs matplotlib (optional)')
    before = files(bad_runs)
    prompt = tmp_path / 'p.wav'
    sf.write(prompt, 0.1 * np.ones(24000), 24000)
    argv = {'evaluate.py': ['--ckpt', str(bad_runs / kind), '--json', str(tmp_path / 'r.json')],
            'sample.py': [str(prompt), '--ckpt', str(bad_runs / kind), '--out',
                          str(tmp_path / 'o.wav')],
            'tour.py': ['--ckpt', str(bad_runs / kind)]}[script]
    one_line_error(run(script, *argv, check=False), str(bad_runs / kind))
    assert files(bad_runs) == before and sorted(os.listdir(tmp_path)) == ['p.wav']


# --- train.py: inputs checked before anything is written ------------------------------------------

@pytest.mark.parametrize('kind, words', [('empty', ['no VAE at']),
                                         ('swapped', ['holds a language model', 'swapped'])])
def test_train_vae_from_a_folder_without_a_vae_writes_nothing(bad_runs, tmp_path, kind, words):
    out = tmp_path / 'new_run'
    r = run('train.py', '--stage', 'lm', '--vae-from', str(bad_runs / kind), '--out', str(out),
            check=False)
    one_line_error(r, *words)
    assert not out.exists()


def test_train_refuses_vae_from_without_stage_lm(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match='--stage lm'):
        train_main(['--vae-from', str(tiny_run), '--out', str(tmp_path / 'o')])
    assert not (tmp_path / 'o').exists()


@pytest.fixture
def resumable(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny run (trained by conftest with TINY and these recipes) to resume."""
    tiny_recipes(monkeypatch)
    run_dir = tmp_path / 'run'
    shutil.copytree(tiny_run, run_dir)
    return run_dir, ['--toy', '--out', str(run_dir), '--vae-steps', '4', '--lm-steps', '4',
                     '--resume', *TINY]


@pytest.mark.parametrize('flags, words', [
    (['--model', 'rq'], ['holds a calm LM', '--model rq']),
    (['--lm.n_layers=2'], ['calm.pt', 'n_layers (checkpoint 1, command 2)']),
    (['--lm-batch', '3'], ['calm.pt', 'batch (checkpoint 4, command 3)']),
    (['--vae.latent_dim=4'], ['vae.pt', 'latent_dim (checkpoint 8, command 4)']),
    (['--vae-steps', '5'], ['vae.pt', 'steps (checkpoint 4, command 5)', 'finished VAE']),
])
def test_resume_with_another_config_names_the_fields_and_writes_nothing(resumable, flags, words):
    """--resume with another kind of LM used to rewrite config.json, then fail with a state-dict
    error of ~200 keys: now each differing field is named, before anything is written."""
    run_dir, argv = resumable
    before = files(run_dir)
    with pytest.raises(SystemExit) as e:
        train_main(argv + flags)
    msg = str(e.value.code)
    assert msg.startswith('error: --resume') and len(msg.splitlines()) == 1
    for w in words:
        assert w in msg, msg
    assert files(run_dir) == before


def test_resume_may_change_the_lm_step_budget_and_keeps_it_without_the_flag(resumable):
    run_dir, argv = resumable
    args = train.parse_args(argv + ['--lm-steps', '6'])
    train.check_inputs(args)   # no SystemExit
    ck = pipeline.read_checkpoint(str(run_dir / 'calm.pt'), 'lm')
    cfg = train.lm_config(args, pipeline.load(str(run_dir))[0])
    assert train.lm_recipe(args, cfg, ck)[0]['steps'] == 6
    # without --lm-steps / --vae-steps: the run's own budgets (4 steps), not the defaults
    args = train.parse_args([a for a in argv if a not in ('--lm-steps', '--vae-steps', '4')])
    train.check_inputs(args)
    assert train.lm_recipe(args, cfg, ck)[0]['steps'] == ck['steps'] == 4
    vk = pipeline.read_checkpoint(str(run_dir / 'vae.pt'), 'vae')
    assert train.vae_recipe(args, vk)['steps'] == 4 != train.RECIPES['vae']['steps']


# --- sample.py: progress, and Ctrl-C keeps what was generated -------------------------------------

def test_sample_ctrl_c_writes_the_frames_generated_so_far(tiny_run, tmp_path):
    """A continuation far too long to wait for: sample.py reports progress with an ETA after a few
    seconds; Ctrl-C then writes the prompt and the frames generated so far, says so, and exits
    130. The frames are those an uninterrupted run of the same seed starts with."""
    prompt, out = tmp_path / 'p.wav', tmp_path / 'o.wav'
    t = np.arange(12000) / 24000
    sf.write(prompt, 0.3 * np.sin(2 * np.pi * 330 * t), 24000)
    p = subprocess.Popen([sys.executable, 'sample.py', str(prompt), '--ckpt', str(tiny_run),
                          '--seconds', '100000', '--out', str(out)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, OMP_NUM_THREADS='1'),
                         # a shell's background job ignores SIGINT, and so would its children
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        progress = p.stderr.readline()      # blocks until the first progress line
        assert progress.startswith('generating: ') and 'ETA' in progress, progress
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 130, stderr
    assert 'Traceback' not in stderr and 'interrupted: the continuation stops after' in stderr
    assert f'wrote {out}' in stdout
    wav, sr = sf.read(out)
    vae, _ = pipeline.load(str(tiny_run))
    n_new = len(wav) // vae.hop - 12000 // vae.hop
    assert len(wav) % vae.hop == 0 and n_new >= 1
    assert f'after {n_new / vae.frame_rate:.1f} of the 100000 s' in stderr
    assert np.abs(wav - sample_in_process(tiny_run, prompt, n_new)[0]).max() < 1e-4
