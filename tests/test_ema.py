"""train.ema_decay: the EMA of the trained params is NumPy's recurrence, lives in the checkpoint (a resume is
bit-identical), and is what export / sampling read; turning it on or off in a resume is one line."""

import sys

import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import checkpoint, config_check, export, sharding, train
from pnapo_jax.data.pipeline import global_batch
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, evaluated_params, init_state, make_setup
from pnapo_jax.step import jit_steps

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402

DECAY = 0.75


def _config(variant: str = "", steps: int = 4):
    config = tiny.get_config(variant)
    config.train.ema_decay = DECAY
    config.train.num_steps, config.train.eval_every, config.checkpoint.every_steps = steps, 0, 2
    config.optim.warmup_steps = 0  # lr 0 at step 0 would leave the LoRA adapters (and so their EMA) unchanged
    return config


def _restored_state(config, workdir, step):
    setup = make_setup(config, jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(str(epath.Path(workdir) / "checkpoints"), config.checkpoint)
    state = ckpt.restore(step, setup.abstract_state, None)
    ckpt.close()
    return jax.device_get({"params": state["params"], "ema": state["ema"]})


@pytest.mark.parametrize("variant", ["", "lora"])
def test_ema_is_the_numpy_recurrence(variant):
    config = _config(variant)
    setup = make_setup(config, jax.devices()[:1])
    state, frozen = init_state(setup, base_params(setup))
    loader = train.make_train_loader(config, train.make_source(config, ""))
    step_fn, _ = jit_steps(setup)
    params = [jax.device_get(state["params"])]
    ema0 = jax.device_get(state["ema"])
    with setup.scope():
        for _ in range(3):
            state, _ = step_fn(state, frozen, global_batch(next(loader), sharding.batch_sharding(setup.mesh)))
            params.append(jax.device_get(state["params"]))
    loader.close()
    jax.tree.map(np.testing.assert_array_equal, ema0, params[0])  # it starts at the starting params
    expected = jax.tree.map(np.float64, params[0])
    for p in params[1:]:
        expected = jax.tree.map(lambda e, q: DECAY * e + (1 - DECAY) * np.float64(q), expected, p)
    ema = jax.device_get(state["ema"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ema, expected)
    differs = lambda a, b: any(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x != y).any()), a, b)))
    assert differs(ema, params[0]) and differs(ema, params[-1])  # neither the start nor the last params
    assert evaluated_params(setup, state) is state["ema"]


@pytest.mark.parametrize("variant", ["", "lora"])
def test_resume_with_ema_is_bit_identical(tmp_path, variant):
    config = _config(variant)
    train.train_and_evaluate(config, str(tmp_path / "straight"), devices=jax.devices()[:1], show_progress=False)
    half = _config(variant, steps=2)
    train.train_and_evaluate(half, str(tmp_path / "resumed"), devices=jax.devices()[:1], show_progress=False)
    train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=jax.devices()[:1], show_progress=False)
    a = _restored_state(config, tmp_path / "straight", 4)
    b = _restored_state(config, tmp_path / "resumed", 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # what export (and sample --workdir, through export.restore_params) reads is the EMA, not the last params
    setup = make_setup(export.load_config(str(tmp_path / "resumed")), jax.devices()[:1])
    step, exported = export.restore_params(setup, str(tmp_path / "resumed"))
    assert step == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(exported), b["ema"])
    differs = jax.tree.map(lambda x, y: bool((x != y).any()), b["ema"], b["params"])
    assert any(jax.tree.leaves(differs))


def test_resume_that_turns_the_ema_on_or_off_is_one_line(tmp_path):
    config = _config(steps=2)
    config.train.ema_decay = 0.0
    train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    config.train.ema_decay = 0.9
    with pytest.raises(UserError, match=r"config.train.ema_decay was 0.0, now 0.9"):
        config_check.check_resume(config, tmp_path)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_ema_decay_out_of_range_is_refused(decay):
    config = tiny.get_config()
    config.train.ema_decay = decay
    with pytest.raises(UserError, match=r"config.train.ema_decay is"):
        config_check.check(config)
