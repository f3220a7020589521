"""Shared fixtures: one tiny trained run (VAE + text-conditioned LM, 4 steps each) for the tests
that only read a checkpoint (test_train's sampling tests, test_cond, test_tour)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import TINY, tiny_recipes, train_main  # noqa: E402


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('tiny_run')
    mp = pytest.MonkeyPatch()
    tiny_recipes(mp)
    # --lm.diffusion_steps=3: the last of the 4 LM steps is sCT, whatever the toy's TrigFlow share
    train_main(['--toy', '--out', str(out), '--vae-steps', '4', '--lm-steps', '4',
                '--lm.diffusion_steps=3', *TINY])
    mp.undo()
    return out
