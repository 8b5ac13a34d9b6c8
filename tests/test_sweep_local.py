"""Sweeps on this machine (`python -m pnapo_jax.sweep --local`), skipping finished points, and the sweep report
over a sweep's workdir: the grid columns from the points' configs, final metrics, bench results, the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pnapo_jax import sweep, sweep_report
from pnapo_jax.errors import UserError

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.py")


def _point(root: Path, name: str, beta: float, lines: list[dict], num_steps: int = 4) -> Path:
    """A point workdir as training leaves it: config.json and metrics.jsonl."""
    config = sweep.load_config(TINY)
    config.pnapo.beta, config.train.num_steps = beta, num_steps
    (root / name).mkdir(parents=True)
    (root / name / "config.json").write_text(config.to_json_best_effort(indent=2))
    (root / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / name


def test_local_sweep_skips_finished_points(tmp_path):
    _point(tmp_path, "beta=100", 100.0, [{"step": 2, "loss": 0.7}, {"step": 4, "loss": 0.6}])
    _point(tmp_path, "beta=200", 200.0, [{"step": 2, "loss": 0.7}])  # stopped half way: resumes
    proc = subprocess.run([sys.executable, "-m", "pnapo_jax.sweep", "--local", f"--config={TINY}",
                           f"--workdir={tmp_path}", "--grid", "pnapo.beta=100,200,300", "--dry-run", "--",
                           "--config.train.num_steps=4"], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "finished already: beta=100"
    assert len(lines) == 3 and all("-m pnapo_jax.main" in line for line in lines[1:])
    assert f"--workdir={tmp_path}/beta=200" in lines[1] and "--config.pnapo.beta=200" in lines[1]
    assert lines[2].endswith("--config.pnapo.beta=300 --config.train.num_steps=4")


def test_sweep_report(tmp_path):
    a = _point(tmp_path, "beta=100", 100.0, [{"step": 2, "loss": 0.7, "eval/reward_mean": 0.5},
                                             {"step": 4, "loss": 0.6}, {"step": 4, "eval/reward_mean": 0.55}])
    _point(tmp_path, "beta=200", 200.0, [{"step": 4, "loss": 0.65, "eval/reward_mean": 0.6}])
    (a / "bench").mkdir()
    (a / "bench" / "results.json").write_text(json.dumps({
        "models": {"base": {"world_reward": {"value": 0.4, "low": 0.3, "high": 0.5}}},
        "win_rates": {"pnapo": {"world_reward": {"value": 0.7, "low": 0.6, "high": 0.8}}}}))
    grid, rows = sweep_report.collect(str(tmp_path))
    assert grid == ["pnapo.beta"]
    assert [(r["point"], r["pnapo.beta"], r["step"], r["loss"], r["eval/reward_mean"]) for r in rows] == [
        ("beta=100", 100.0, 4, 0.6, 0.55), ("beta=200", 200.0, 4, 0.65, 0.6)]
    assert rows[0]["bench:bench/base/world_reward"] == 0.4 and rows[0]["win:bench/pnapo/world_reward"] == 0.7
    md = sweep_report.write(str(tmp_path), "eval/reward_mean", str(tmp_path / "report"))
    assert md.splitlines()[0] == "| point | pnapo.beta | step | loss | eval/reward_mean |"
    assert "| beta=200 | 200 | 4 | 0.65 | 0.6 |" in md
    assert (tmp_path / "report" / "sweep_report.csv").read_text().startswith("point,pnapo.beta,step,loss")
    assert Image.open(tmp_path / "report" / "sweep_eval_reward_mean.png").size[0] > 100
    with pytest.raises(UserError, match="--metric=eval/nothing: no point has it"):
        sweep_report.write(str(tmp_path), "eval/nothing", str(tmp_path / "report"))
    with pytest.raises(UserError, match="no point workdirs"):
        sweep_report.collect(str(tmp_path / "report"))


@pytest.mark.slow
def test_local_sweep_trains_each_point_once(tmp_path):
    argv = [sys.executable, "-m", "pnapo_jax.sweep", "--local", f"--config={TINY}", f"--workdir={tmp_path}",
            "--grid", "pnapo.beta=100,200", "--", "--config.train.num_steps=2", "--config.checkpoint.every_steps=2"]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    assert all(sweep.finished(str(tmp_path / f"beta={b}")) for b in (100, 200))
    again = subprocess.run(argv, check=True, capture_output=True, text=True)
    assert again.stdout.splitlines() == ["finished already: beta=100", "finished already: beta=200"]
    _, rows = sweep_report.collect(str(tmp_path))
    assert [r["pnapo.beta"] for r in rows] == [100.0, 200.0] and all(r["step"] == 2 for r in rows)


def test_torn_json_files_are_one_line_naming_the_file(tmp_path):
    """A point's config.json or results.json cut short by a crash: one line naming it, not a JSONDecodeError."""
    a = _point(tmp_path, "beta=100", 100.0, [{"step": 4, "loss": 0.6}])
    (a / "bench").mkdir()
    (a / "bench" / "results.json").write_text('{"models": {"base": ')
    with pytest.raises(UserError, match=r"bench/results.json is not valid JSON"):
        sweep_report.collect(str(tmp_path))
    (a / "bench" / "results.json").unlink()
    (a / "config.json").write_text('{"train": ')
    with pytest.raises(UserError, match=r"beta=100/config.json is not valid JSON"):
        sweep_report.collect(str(tmp_path))
    with pytest.raises(UserError, match=r"beta=100/config.json is not valid JSON"):
        sweep.finished(str(a))
