"""gs:// for the benchmark (its prompt file, images, rows and report) and for the sweep report over a sweep on
gs://, through tests/memory_gcs.py's stand-in (epath's fsspec backend, as gcsfs serves it; a path that went
through pathlib instead lands in the local "gs:" folder). The same files as a local run, a resume that draws
nothing, and the sweep report's table and plot next to the points."""

import json
import subprocess
import sys

import pytest
from etils import epath
from memory_gcs import gcs  # noqa: F401 (the fixture)

from pnapo_jax import sweep, sweep_report
from pnapo_jax.bench import benchmark, sampling
from pnapo_jax.world import demo_base as base
from pnapo_jax.world import grammar

DEMO_BASE = str(base.DEFAULT_BASE)
DEMO_REFLOW = str(base.DEFAULT_BASE.parent / "demo_base_reflow")
PROMPTS = grammar.prompts("heldout")[:3]


def _opts(out: str, prompts: str) -> benchmark.Options:
    return benchmark.Options(models=f"base={DEMO_BASE},reflow={DEMO_REFLOW}", prompts=prompts, out=out,
                             scorers="world_reward,world_fidelity", seeds=1, num_steps=2, seed=5, batch_size=8,
                             show_progress=False)


def _counting_saves(monkeypatch) -> list:
    saved, save = [], sampling.save_png
    monkeypatch.setattr(sampling, "save_png",
                        lambda image, path, *text: (saved.append(str(path)), save(image, path, *text)))
    return saved


def test_evaluate_into_gcs_writes_what_a_local_run_writes_and_resumes(gcs, tmp_path, monkeypatch):  # noqa: F811
    bucket = epath.Path("gs://bucket")
    (bucket / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    local = benchmark.run(_opts(str(tmp_path / "local"), str(tmp_path / "prompts.txt")))
    saved = _counting_saves(monkeypatch)
    remote = benchmark.run(_opts("gs://bucket/bench", "gs://bucket/prompts.txt"))
    assert not (tmp_path / "gs:").exists(), "a gs:// path went through pathlib"
    assert remote == local
    out = bucket / "bench"
    assert sorted(saved) == sorted(str(sampling.image_path(out, m, p, 0)) for m in ("base", "reflow")
                                   for p in range(3))
    for name in ("results.json", "results.md", "scores.csv", "report.html", benchmark.MANIFEST):
        assert (out / name).read_text() == (tmp_path / "local" / name).read_text().replace(
            str(tmp_path / "local"), "gs://bucket/bench"), name
    for m in ("base", "reflow"):
        for p in range(3):
            assert sampling.image_path(out, m, p, 0).read_bytes() == sampling.image_path(
                tmp_path / "local", m, p, 0).read_bytes()
    assert not [k for k in gcs if ".tmp_" in k]

    saved.clear()
    assert benchmark.run(_opts("gs://bucket/bench", "gs://bucket/prompts.txt")) == local
    assert saved == []  # the rerun found every image


def test_sweep_report_over_a_gcs_sweep_with_its_benchmarks(gcs, tmp_path):  # noqa: F811
    root = epath.Path("gs://bucket/sweep")
    for beta, reward in ((100.0, 0.5), (200.0, 0.6)):
        point = root / f"beta={int(beta)}"
        point.mkdir(parents=True)
        config = sweep.load_config(str(epath.Path(__file__).parent.parent / "configs" / "tiny.py"))
        config.pnapo.beta = beta
        (point / "config.json").write_text(config.to_json_best_effort(indent=2))
        (point / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 0.6, "eval/reward_mean": reward}) + "\n")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    summary = benchmark.run(_opts("gs://bucket/sweep/beta=100/bench", str(tmp_path / "prompts.txt")))

    md = sweep_report.write("gs://bucket/sweep", "eval/reward_mean")
    assert not (tmp_path / "gs:").exists(), "a gs:// path went through pathlib"
    assert md.splitlines()[0] == "| point | pnapo.beta | step | loss | eval/reward_mean |"
    assert "| beta=200 | 200 | 4 | 0.6 | 0.6 |" in md
    assert (root / "sweep_report.md").read_text() == md
    csv_text = (root / "sweep_report.csv").read_text()
    reward = summary["models"]["reflow"]["world_reward"]["value"]
    assert "bench:bench/reflow/world_reward" in csv_text.splitlines()[0] and f"{reward}" in csv_text
    assert (root / "sweep_eval_reward_mean.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command_prints_its_table_for_a_gcs_out(tmp_path):
    """The command itself with --out=gs://...: the table printed at the end, nothing written locally."""
    script = (f"import sys; sys.path.insert(0, {str(epath.Path(__file__).parent)!r}); import memory_gcs; "
              "memory_gcs.register(); from pnapo_jax import evaluate; evaluate.run()")
    args = [f"--models=base={DEMO_BASE}", "--prompts=world:heldout", "--max_prompts=2", "--seeds=1",
            "--num_steps=2", "--out=gs://bucket/cli"]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("world-heldout: 2 prompts x 1 seeds") and "| base |" in proc.stdout
    assert "wrote gs://bucket/cli/results.json" in proc.stderr and not (tmp_path / "gs:").exists()


def test_models_on_gcs(gcs, tmp_path, monkeypatch):  # noqa: F811
    """A transformer folder on gs:// samples what its local copy samples; a training workdir on gs:// (a pod's) is
    recognised as a run; a pipeline folder on gs:// is refused in one line."""
    from pnapo_jax.bench import models
    from pnapo_jax.convert import files
    from pnapo_jax.errors import UserError

    monkeypatch.setattr(files, "DEFAULT_CACHE_DIR", str(tmp_path / "cache"))
    for f in epath.Path(DEMO_REFLOW).iterdir():
        (epath.Path("gs://bucket/reflow") / f.name).write_bytes(f.read_bytes())
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    opts = lambda out, reflow: benchmark.Options(**{**vars(_opts(out, str(tmp_path / "p.txt"))),
                                                    "models": f"base={DEMO_BASE},reflow={reflow}"})
    assert benchmark.run(opts("gs://bucket/a", "gs://bucket/reflow")) == benchmark.run(opts(str(tmp_path / "b"),
                                                                                             DEMO_REFLOW))
    assert json.loads(epath.Path("gs://bucket/a/benchmark.json").read_text())["models"]["reflow"]["path"] == \
        "gs://bucket/reflow"

    run = epath.Path("gs://bucket/runs/pnapo")
    (run / "checkpoints" / "8").mkdir(parents=True)
    (run / "checkpoints" / "8" / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "config.json").write_text("{}")
    assert models.parse("pnapo=gs://bucket/runs/pnapo@8") == [models.ModelSpec("pnapo", str(run), "run", 8)]
    pipe = epath.Path("gs://bucket/pipe")
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "transformer" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="a pipeline folder must be local"):
        models.parse("base=gs://bucket/pipe")
