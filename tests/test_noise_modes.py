"""benchmarks/noise_modes.py's selection and summary rules on hand-made eval curves (the runs themselves are what
tests/test_notebooks.py's ablation notebook exercises)."""

import argparse
import importlib.util
import json
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "noise_modes.py"


@pytest.fixture(scope="module")
def nm():
    spec = importlib.util.spec_from_file_location("noise_modes", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ev(step: int, reward: float, fidelity: float) -> dict:
    """One eval line against a base of reward 0.5 and fidelity 1.0."""
    return {"step": step, "eval/reward_mean": reward, "eval/reward_base_mean": 0.5, "eval/fidelity_mean": fidelity,
            "eval/fidelity_base_mean": 1.0}


CURVE = [ev(0, 0.5, 1.0), ev(10, 0.55, 1.1), ev(20, 0.62, 1.3), ev(30, 0.7, 2.0)]


def test_pick_prefers_reward_within_the_fidelity_bound(nm):
    grid = [dict(beta=1, evals=[ev(5, 0.9, 3.0)]), dict(beta=2, evals=[ev(5, 0.6, 1.1)]),
            dict(beta=3, evals=[ev(5, 0.55, 1.0)])]
    assert nm.pick(grid, 1.2)["beta"] == 2  # beta=1 rewards most but drifted off the data
    assert nm.pick(grid, 5.0)["beta"] == 1
    assert nm.pick(grid[:1], 1.2)["beta"] == 1  # none within the bound: the best of all


def test_best_gain_and_steps_to(nm):
    assert nm.best_gain(CURVE, 1.2) == pytest.approx(0.05)
    assert nm.best_gain(CURVE, 1.5) == pytest.approx(0.12)
    assert nm.best_gain(CURVE, 0.9) is None
    assert nm.steps_to(CURVE, 0.1, 1.5) == 20
    assert nm.steps_to(CURVE, 0.1, 1.2) is None  # reached only off the data
    assert nm.steps_to(CURVE, 0.0, 1.2) == 0


def test_frontier_keeps_the_upper_left_points(nm):
    points = [(1.0, 0.5), (1.1, 0.4), (1.2, 0.6), (1.3, 0.6), (2.0, 0.7), (0.9, 0.45)]
    assert nm.frontier(points) == [(0.9, 0.45), (1.0, 0.5), (1.2, 0.6), (2.0, 0.7)]


def test_error_table_reads_the_per_t_errors_of_each_run(nm, tmp_path):
    """The per-t error table from runs' metrics.jsonl: the last train line with err/*, empty bins skipped."""
    lines = [{"step": 10, "loss": 0.6, **{f"err/{n}_t{k}": 9.0 for n in nm.ERROR_NAMES for k in (0, 1)}},
             {"step": 20, "loss": 0.5, "count/t_bucket_0": 2, "count/t_bucket_1": 0,
              "err/policy_w_t0": 0.1, "err/ref_w_t0": 0.2, "err/policy_l_t0": 0.5, "err/ref_l_t0": 0.3,
              **{f"err/{n}_t1": 0.0 for n in nm.ERROR_NAMES}},
             {"step": 20, "eval/reward_mean": 0.7}]
    runs = {}
    for seed, scale in ((1, 1.0), (2, 3.0)):
        workdir = tmp_path / f"s{seed}"
        workdir.mkdir()
        scaled = [{k: v * scale if k.startswith("err/") else v for k, v in x.items()} for x in lines]
        (workdir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in scaled) + "\n")
        runs.setdefault("m", []).append(dict(seed=seed, errors=nm.last_errors(workdir)))
    assert nm.last_errors(tmp_path / "none") == {}
    rows = nm.error_table(runs)
    assert rows[2] == "| m | 0 | 0.2000 | 0.4000 | 1.0000 | 0.6000 | -0.2000 | +0.4000 |"
    assert rows[3] == "| m | 1 | nan | nan | nan | nan | +nan | +nan |"  # the bin held no example


def test_regen_costs_sum_an_iterative_runs_rounds(nm, tmp_path):
    lines = [{"step": 25, "regen/round": 1, "regen/seconds": 10.0, "regen/images": 540, "regen/model_forwards": 8640},
             {"step": 30, "loss": 0.5},
             {"step": 50, "regen/round": 2, "regen/seconds": 12.0, "regen/images": 540, "regen/model_forwards": 8640}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert nm.regen_costs(tmp_path) == {"seconds": 22.0, "images": 1080, "model_forwards": 17280}
    assert nm.regen_costs(tmp_path / "none") == {}
    assert nm.METHODS["iterative PNAPO (new pairs from the policy after each third of the run)"] == "iterative"
    assert set(nm.GENERATION_VARIANTS) <= set(nm.METHODS.values())


def test_a_two_variant_method_and_the_pinned_protocol(nm, tmp_path):
    """A method of two variants ("a+b") gets both; every run keeps the README protocol's schedule and raw-weight
    evals whatever the demo config says now; the cached-reference method shares one cache beside its pairs."""
    c = nm.demo_config("independent+shared_noise", "")
    assert c.pnapo.noise_mode == "independent" and c.generate.shared_noise
    assert nm.METHODS["Flow-DPO on the shared-noise pairs (a control)"] == "independent+shared_noise"
    args = argparse.Namespace(demo_variant="", base="", steps=60)
    c = nm.run_config(args, "ref_cache", 1000.0, 4e-5, 1, str(tmp_path / "pairs"), 15)
    assert (c.pnapo.n1, c.pnapo.n2, c.train.ema_decay) == (18, 54, 0.0)
    assert c.t_sampling.kind == "grid" and c.pnapo.ref_cache_dir == str(tmp_path / "ref_cache")
    assert nm.run_config(args, "iterative", 1000.0, 4e-5, 1, "p", 15).train.regenerate_every == 20


def test_the_readmes_picks_name_methods_the_script_has(nm):
    """benchmarks/noise_modes_picks.json (the README's picks, for --pick) keys methods by their names here."""
    picks = json.loads((PATH.parent / "noise_modes_picks.json").read_text())
    assert set(picks) <= set(nm.METHODS) and all(set(p) == {"beta", "lr"} for p in picks.values())
