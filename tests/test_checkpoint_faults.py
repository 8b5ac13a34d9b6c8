"""Checkpoints off the happy path: readers never touch a workdir another run may be training in, and a damaged
newest checkpoint falls back to the newest one that restores (export and resume), kept and named, never deleted.

One tiny run (configs/tiny.py, a checkpoint after each of 2 steps) is copied for each case.
"""

import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import checkpoint, export, train
from pnapo_jax.errors import UserError
from pnapo_jax.setup import make_setup

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def _config(num_steps: int = 2):
    config = tiny.get_config()
    config.train.num_steps, config.train.eval_every, config.checkpoint.every_steps = num_steps, 0, 1
    return config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> epath.Path:
    run = epath.Path(tmp_path_factory.mktemp("pristine")) / "run"
    train.train_and_evaluate(_config(), str(run), devices=jax.devices()[:1], show_progress=False)
    return run


@pytest.fixture
def run(pristine, tmp_path) -> epath.Path:
    shutil.copytree(pristine, tmp_path / "run")
    return epath.Path(tmp_path / "run")


def _params(run: epath.Path, step: int):
    """Checkpoint `step`'s trained params, read with the whole train state as training reads it."""
    setup = make_setup(_config(), jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(run / "checkpoints"), setup.config.checkpoint, handle_sigterm=False,
                                  read_only=True)
    try:
        state = ckpt.restore(step, setup.abstract_state, None)
        assert int(state["step"]) == step
        return jax.device_get(state["params"])
    finally:
        ckpt.close()


def _tree(directory: epath.Path) -> dict[str, int]:
    """Every file under `directory` -> its size."""
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def _damage(step_dir: epath.Path, how: str) -> None:
    state = step_dir / "state"
    if how == "truncated_array":
        for f in (state / "ocdbt.process_0" / "d").iterdir():
            f.write_bytes(f.read_bytes()[:10])
    elif how == "no_METADATA":
        (state / "_METADATA").unlink()
    else:
        (state / "manifest.ocdbt").unlink()


DAMAGES = ["truncated_array", "no_METADATA", "no_manifest"]


def _assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_export_leaves_a_save_in_flight_alone(run, tmp_path):
    """A trainer's `N.orbax-checkpoint-tmp-*` must survive export (before the fix export deleted it and the
    training run died), and export writes nothing into the workdir."""
    in_flight = run / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "part").write_text("being written")
    before = _tree(run)
    assert export.export(str(run), str(tmp_path / "out"), "diffusers") == 2
    assert _tree(run) == before


@pytest.mark.parametrize("how", DAMAGES)
def test_export_falls_back_to_the_newest_checkpoint_that_restores(pristine, run, how):
    good = _params(run, 1)
    _damage(run / "checkpoints" / "2", how)
    before = _tree(run)
    setup = make_setup(export.load_config(str(run)), jax.devices()[:1])
    step, params = export.restore_params(setup, str(run))
    # Export restores the params alone: without _METADATA they still read (step 2); otherwise step 1.
    assert step == (2 if how == "no_METADATA" else 1)
    _assert_equal(jax.device_get(params), good if step == 1 else _params(pristine, 2))
    assert _tree(run) == before  # the damaged checkpoint is left as it was
    if step == 1:
        with pytest.raises(UserError, match=r"checkpoint .*checkpoints/2 does not restore \(left untouched\): "):
            export.restore_params(setup, str(run), step=2)


@pytest.mark.parametrize("how", DAMAGES)
def test_resume_falls_back_and_keeps_the_damaged_checkpoint(pristine, run, how):
    """Resuming over a damaged step-2 checkpoint restarts from step 1, retrains step 2 to the same weights as
    the uninterrupted run, and keeps the damaged one as checkpoints/2.unreadable, byte for byte."""
    bad = run / "checkpoints" / "2"
    _damage(bad, how)
    damaged = _tree(bad)
    train.train_and_evaluate(_config(), str(run), devices=jax.devices()[:1], show_progress=False)
    assert _tree(run / "checkpoints" / "2.unreadable") == damaged
    _assert_equal(_params(run, 2), _params(pristine, 2))


def test_nothing_restores_is_one_line_and_moves_nothing(run):
    for step in (1, 2):
        _damage(run / "checkpoints" / str(step), "no_manifest")
    before = _tree(run / "checkpoints")
    with pytest.raises(UserError, match=r"no checkpoint in .* restores \(left untouched\): step 2: .*; step 1: "):
        train.train_and_evaluate(_config(), str(run), devices=jax.devices()[:1], show_progress=False)
    assert _tree(run / "checkpoints") == before
