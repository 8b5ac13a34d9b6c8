"""benchmarks/grad_variance.py: its variance estimator against NumPy, the methods' gradients on pairs whose
winner is the loser (true by construction of each method), and the script end to end on the fast demo."""

import importlib.util
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from pnapo_jax import train
from pnapo_jax.data.pipeline import global_batch
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, make_setup
from pnapo_jax.sharding import batch_sharding
from pnapo_jax.step import batch_gradients
from pnapo_jax.world import demo_base

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gv():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling imports (machine, noise_modes), as when run
    try:
        spec = importlib.util.spec_from_file_location("grad_variance", ROOT / "benchmarks" / "grad_variance.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_spread_is_numpys_mean_and_variance_of_the_draws(gv):
    rng = np.random.default_rng(0)
    g_RxP = rng.standard_normal((7, 11)) + 2.0 * rng.standard_normal(11)  # a non-zero mean gradient
    s = gv.spread(g_RxP @ g_RxP.T)
    mean_sq = np.sum(g_RxP.mean(0) ** 2)
    var = np.var(g_RxP, axis=0, ddof=1).sum()
    assert s["mean_norm"] == pytest.approx(np.sqrt(mean_sq), rel=1e-12)
    assert s["total_var"] == pytest.approx(var, rel=1e-12)
    assert s["rel_var"] == pytest.approx(var / mean_sq, rel=1e-12)
    assert s["signal_sq"] == pytest.approx(mean_sq - var / 7, rel=1e-12)
    b = gv.bootstrap(g_RxP @ g_RxP.T, resamples=200)
    assert b["rel_var_p5"] < s["rel_var"] < b["rel_var_p95"] and b["rel_var_std"] > 0
    assert b == gv.bootstrap(g_RxP @ g_RxP.T, resamples=200)  # seeded


def gradient(noise_mode: str, objective: str = "dpo", sft_weight: float = 0.0, same_images: bool = True):
    """The tiny model's flattened training gradient at its init (reference = policy) on 4 synthetic pairs, with
    the loser replaced by the winner when `same_images`."""
    c = load("tiny").get_config()
    c.data.source = "synthetic"
    c.train.global_batch_size = 4
    c.pnapo.noise_mode, c.pnapo.objective, c.pnapo.sft_weight = noise_mode, objective, sft_weight
    setup = make_setup(c, jax.devices()[:1])
    loader = train.make_train_loader(c, train.make_source(c, ""))
    batch = next(loader)
    loader.close()
    if same_images:
        batch = {**batch, **{k.replace("_w", "_l"): v for k, v in batch.items() if k in ("x0_w", "x1_w")}}
    params = base_params(setup)
    with setup.scope():
        grads, _ = jax.jit(lambda p, b: batch_gradients(setup, p, {"ref": params}, b, jax.random.PRNGKey(3), 0))(
            params, global_batch(batch, batch_sharding(setup.mesh)))
    return np.asarray(ravel_pytree(grads)[0], np.float64)


def test_a_pair_of_one_image_has_no_preference_gradient_when_its_noise_is_shared():
    """Winner = loser: with one noise for both (PNAPO's recorded x1_w = x1_l, Flow-DPO's shared draw) the two errors
    are equal, so DPO's gradient vanishes; separate noises (independent_unshared) leave the noise's
    difference as gradient, and a winner SFT term is a gradient of its own."""
    unshared = np.linalg.norm(gradient("independent_unshared"))
    assert unshared > 1e-3
    for mode in ("recorded", "independent"):  # IPO's is twice DPO's here (the next test)
        assert np.linalg.norm(gradient(mode)) <= 1e-6 * unshared, mode
    assert np.linalg.norm(gradient("recorded", sft_weight=1.0)) > 1e-3 * unshared


def test_ipo_gradient_is_twice_dpos_where_policy_is_reference():
    """At margin 0 (policy = reference) d/dm (m - 1/2)^2 = -1 and d/dm -log sigma(m) = -1/2: the same direction, so
    IPO's relative variance at the base equals DPO's (what the benchmark's scale note says)."""
    dpo = gradient("recorded", same_images=False)
    np.testing.assert_allclose(gradient("recorded", "ipo", same_images=False), 2 * dpo, rtol=1e-5,
                               atol=1e-6 * np.abs(dpo).max())


def test_policy_params_from_a_transformer_folder_are_its_weights_not_the_bases(gv, tmp_path):
    args = gv.parser().parse_args(["--pairs=synthetic", "--demo_variant=fast"])
    setup = make_setup(gv.method_config("", args, "synthetic"), jax.devices()[:1])
    cfg, base = demo_base.load_base()
    moved = jax.tree.map(lambda x: x + 0.25, base)  # exact in the stored dtype for these weights' magnitudes
    demo_base.save_base(tmp_path, cfg, moved, {})
    assert gv.policy_params(setup, base, "") is base
    loaded = gv.policy_params(setup, base, str(tmp_path))
    stored = jax.tree.map(lambda x: np.asarray(x, demo_base.STORE_DTYPE).astype(np.float32), moved)
    jax.tree.map(np.testing.assert_array_equal, loaded, stored)


def test_script_end_to_end_on_the_fast_demo(gv, tmp_path, capsys):
    out = tmp_path / "gv.json"
    args = gv.parser().parse_args(["--pairs=synthetic", "--demo_variant=fast", "--batch=2", "--draws=3",
                                   "--methods=independent_unshared,shared_noise,independent+shared_noise",
                                   f"--out={out}"])
    gv.main(args)
    text = capsys.readouterr().out
    # both methods of the shared-noise pairs (PNAPO and the Flow-DPO control) need them: neither runs on --pairs
    assert "\nshared_noise: skipped, no pairs" in text and "\nindependent+shared_noise: skipped, no pairs" in text
    assert "load before" in text and "relative variance" in text
    result = json.loads(out.read_text())["methods"]
    assert set(result) == {"independent_unshared"}
    for kind in ("fixed", "redrawn"):
        r = result["independent_unshared"][kind]
        assert r["total_var"] > 0 and r["mean_norm"] > 0
        assert r["rel_var"] == pytest.approx(r["total_var"] / r["mean_norm"] ** 2)
    assert "| independent noise, unshared (one per image) |" in text
    gv.main(gv.parser().parse_args([f"--table={out}"]))  # the table again, from the JSON
    again = capsys.readouterr().out.strip()
    assert sum(line.startswith("| ") for line in again.splitlines()) == 2 and text.strip().endswith(again)


def test_missing_pairs_are_one_line_naming_the_flag_before_any_work(gv, tmp_path):
    """A --pairs that does not exist is refused up front, naming --pairs (it used to skip every method and write an
    empty result, the skip line naming --shared_noise_pairs)."""
    args = gv.parser().parse_args([f"--pairs={tmp_path / 'nope'}", "--methods=independent_unshared",
                                   f"--out={tmp_path / 'gv.json'}"])
    with pytest.raises(UserError, match=rf"^--pairs={tmp_path / 'nope'}: not found"):
        gv.main(args)
    assert not (tmp_path / "gv.json").exists()
