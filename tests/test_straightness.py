"""world.straightness on paths whose gap is known, and the reflow and straightness CLIs end to end."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from pnapo_jax import flow
from pnapo_jax.world import demo_base as base
from pnapo_jax.world import reflow, straightness

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def test_a_field_constant_along_straight_lines_has_no_gap():
    """v(x, t) = (x - a) / t is the exact flow of straight lines into the point a, and Euler follows it exactly."""
    a_BxIxC = jax.random.normal(jax.random.key(0), (3, 4, 2))

    def velocity(variables, x_t, t, cond):
        return (x_t - variables) / t[:, None, None]

    noise = jax.random.normal(jax.random.key(1), a_BxIxC.shape)
    traj = flow.euler_sample(velocity, a_BxIxC, noise, {}, 8, return_trajectory=True)
    np.testing.assert_allclose(traj[-1], a_BxIxC, atol=1e-5)
    gap = straightness.path_gap(np.asarray(traj), np.asarray(flow.flux_sigmas(8, 4)))
    for k in ("rel_distance", "rms_distance", "velocity_deviation"):
        np.testing.assert_allclose(gap[k], 0, atol=1e-5)


def test_a_quarter_circle_gives_the_analytic_gap():
    """x(t) = (cos(pi t / 2), sin(pi t / 2)): at t the chord's point (1 - t, t) is this far from the arc."""
    t_S = np.linspace(1, 0, 401)
    traj_Sx1x1x2 = np.stack([np.cos(np.pi * t_S / 2), np.sin(np.pi * t_S / 2)], -1)[:, None, None]
    gap = straightness.path_gap(traj_Sx1x1x2, t_S)
    expected = np.hypot(np.cos(np.pi * t_S / 2) - (1 - t_S), np.sin(np.pi * t_S / 2) - t_S) / np.hypot(1 - t_S, t_S)
    np.testing.assert_allclose(gap["rel_distance"], expected, atol=1e-12)
    assert np.isclose(gap["rel_distance"][200], np.sqrt(2) - 1)  # t = 1/2
    # Speed pi/2 along the arc vs the chord (-1, 1): ||v - chord||^2 / 2 = pi^2/8 + 1 - pi/sqrt(2) cos(theta - pi/4),
    # theta = pi t / 2; a step's velocity is the arc's at the step's midpoint (to O(step^2)).
    angle = np.pi * (t_S[:-1] + t_S[1:]) / 4 - np.pi / 4
    np.testing.assert_allclose(gap["velocity_deviation"], np.pi**2 / 8 + 1 - np.pi / np.sqrt(2) * np.cos(angle),
                               atol=1e-4)
    s = straightness.summary(gap)
    assert np.isclose(s["rel_distance_max"], np.sqrt(2) - 1)
    # The integral over t of the per-step deviation: pi^2/8 + 1 - (pi/sqrt 2)(2 sqrt 2 / pi) = pi^2/8 - 1.
    assert np.isclose(s["velocity_deviation_integral"], np.pi**2 / 8 - 1, atol=1e-4)


def _cli(module: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_reflow_writes_a_loadable_base_that_straightness_measures(tmp_path):
    out = tmp_path / "reflowed"
    _cli("pnapo_jax.world.reflow", f"--out={out}", "--pairs=4", "--steps=2", "--batch=2", "--num_steps=2",
         "--log_every=1")
    cfg, params = base.load_base(out)
    base_cfg, base_params = base.load_base()
    assert cfg == base_cfg
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(base_params), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)
    info = json.loads((out / reflow.REFLOW_INFO).read_text())
    assert (info["pairs"], info["steps"], info["base"]) == (4, 2, base.MODEL_ID)

    _cli("pnapo_jax.world.straightness", f"--base={base.DEFAULT_BASE}", f"--base={out}", f"--out={tmp_path}",
         "--num_prompts=2", "--noises_per_prompt=1", "--num_steps=2,3")
    result = json.loads((tmp_path / "straightness.json").read_text())
    assert [(r["base"], r["num_steps"]) for r in result["runs"]] == [
        (str(base.DEFAULT_BASE), 2), (str(base.DEFAULT_BASE), 3), (str(out), 2), (str(out), 3)]
    run = result["runs"][1]
    assert len(run["t"]) == len(run["rel_distance"]) == 4 and len(run["velocity_deviation"]) == 3
    assert run["rel_distance"][0] == run["rel_distance"][-1] == 0 and 0 < run["summary"]["rel_distance_mean"] < 1
    assert 0 < run["reward_mean"] <= 1 and run["fidelity_mean"] >= 0
    assert (tmp_path / "straightness.png").stat().st_size > 0


SHIPPED = base.DEFAULT_BASE.parent / "demo_base_reflow"  # the shipped base reflowed with reflow's defaults


def test_shipped_reflowed_base_loads_and_records_how_it_was_made():
    cfg, _ = base.load_base(SHIPPED)
    assert cfg == base.demo_model_config()
    info = json.loads((SHIPPED / reflow.REFLOW_INFO).read_text())
    assert (info["base"], info["pairs"], info["steps"], info["seed"]) == (base.MODEL_ID, 540, 120, 0)
