"""tour.py on a tiny trained run: every figure is written as a valid PNG; matplotlib stays optional.
"""
import os
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIGURES = ['01_data.png', '02_vae.png', '03_trigflow.png', '04_temperature.png',
           '05_continuation.png', '06_training.png']


def png_size(path):
    """(width, height) from a PNG's signature and IHDR chunk; raises if the file is not a PNG."""
    with open(path, 'rb') as f:
        head = f.read(24)
    assert head[:8] == b'\x89PNG\r\n\x1a\n', f'{path}: not a PNG'
    assert head[12:16] == b'IHDR', f'{path}: no IHDR chunk'
    return struct.unpack('>II', head[16:24])


def test_smoke_tour_writes_every_figure(tiny_run, tmp_path, monkeypatch):
    """A smoke test: the figures are written and drawn (their content is checked by eye)."""
    pytest.importorskip('matplotlib', reason='tour.py needs matplotlib (optional)')
    import tour
    # figure 03 (d) trains two heads for minutes: here they need only be drawn (the map test
    # checks what they learn)
    monkeypatch.setattr(tour, 'HEAD_ITERS', 100)
    monkeypatch.setattr(tour, 'LSD_ITERS', 100)
    out = tmp_path / 'tour'
    try:
        assert tour.main(['--ckpt', str(tiny_run), '--out', str(out), '--seconds', '1']) == 0
    finally:
        torch.set_flush_denormal(False)   # tour.main sets it process-wide; hypothesis needs
                                          # subnormals
    assert sorted(os.listdir(out)) == FIGURES
    for name in FIGURES:
        w, h = png_size(out / name)
        assert w > 100 and h > 100, (name, w, h)
        # drawn, and small enough to commit
        assert 5_000 < os.path.getsize(out / name) < 1_000_000, name


def test_tour_without_matplotlib_says_so_in_one_line(tiny_run, tmp_path):
    """matplotlib hidden (sys.modules entry None makes its import fail): one clear line, exit 1, no
    figures."""
    code = ('import sys, runpy; sys.modules["matplotlib"] = None; '
            f'sys.argv = ["tour.py", "--ckpt", {str(tiny_run)!r}, '
            f'"--out", {str(tmp_path / "t")!r}]; '
            'runpy.run_path("tour.py", run_name="__main__")')
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 1
    assert r.stderr.strip() == 'error: tour.py needs matplotlib: pip install matplotlib'
    assert not (tmp_path / 't').exists()


def test_tour_help_and_missing_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, 'tour.py', '--help'], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and 'usage' in r.stdout
    r = subprocess.run([sys.executable, 'tour.py', '--ckpt', str(tmp_path / 'nothing')], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert 'no checkpoint' in r.stderr or 'needs matplotlib' in r.stderr


def test_only_tour_imports_matplotlib():
    """matplotlib is optional: no other module of the project may import it."""
    for name in os.listdir(ROOT):
        if name.endswith('.py') and name != 'tour.py':
            assert 'matplotlib' not in open(os.path.join(ROOT, name)).read(), name
