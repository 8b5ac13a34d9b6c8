"""pnapo_jax.setup does its work once: no optimizer for commands that never train, shapes and shardings computed
once per setup."""

import os
import sys

import jax

from pnapo_jax.setup import make_setup

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import tiny  # noqa: E402


def test_no_optimizer_until_something_trains():
    setup = make_setup(tiny.get_config(), jax.devices()[:1])
    _ = setup.abstract_params, setup.abstract_frozen, setup.velocity, setup.record_spec  # export's, sampling's
    assert "tx" not in vars(setup)
    _ = setup.abstract_state  # a checkpoint's restore target holds the optimizer state: now it is built
    assert "tx" in vars(setup)


def test_shapes_and_shardings_are_computed_once():
    setup = make_setup(tiny.get_config("lora"), jax.devices()[:1])
    calls = []
    init = setup.backbone.init
    object.__setattr__(setup, "backbone", type(setup.backbone)(**{**vars(setup.backbone), "init": lambda *a: (
        calls.append(1), init(*a))[1]}))
    for _ in range(2):
        _ = (setup.abstract_variables, setup.abstract_state, setup.abstract_frozen, setup.state_shardings,
             setup.frozen_shardings, setup.opt_state_shardings, setup.abstract_params)
    assert calls == [1]
