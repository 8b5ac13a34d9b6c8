"""The benchmark command (pnapo_jax.bench, python -m pnapo_jax.evaluate): prompt sets read from files written in
each format, the statistics against scipy, model and scorer checks, and the embedded world end to end: paired
noises (checked against the world's own seeded sampler), resuming, results and the HTML report rendered in
headless Chromium."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import stats as scipy_stats

from pnapo_jax.bench import benchmark, models, prompt_sets, sampling, scorers, stats
from pnapo_jax.errors import UserError
from pnapo_jax.world import demo_base as base
from pnapo_jax.world import grammar

DEMO_BASE = str(base.DEFAULT_BASE)
DEMO_REFLOW = str(base.DEFAULT_BASE.parent / "demo_base_reflow")


# --- prompt sets ---------------------------------------------------------------------------------------------

def test_text_and_hpdv2(tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\n  two cats \n")
    assert prompt_sets.read(str(tmp_path / "p.txt")).prompts == ["a red fox", "two cats"]
    (tmp_path / "blank.txt").write_text("a\n\nb\n")
    with pytest.raises(UserError, match=r"blank.txt: blank prompt on line\(s\) \[2\]"):
        prompt_sets.read(str(tmp_path / "blank.txt"))
    # hpsv2's benchmark: style -> prompts in one object, or one style's list in its own file.
    (tmp_path / "hpd.json").write_text(json.dumps({"anime": ["a", "b"], "photo": ["c"]}))
    got = prompt_sets.read(str(tmp_path / "hpd.json"))
    assert got.prompts == ["a", "b", "c"] and got.categories == {"style": ["anime", "anime", "photo"]}
    (tmp_path / "paintings.json").write_text(json.dumps(["d", "e"]))
    assert prompt_sets.read(str(tmp_path / "paintings.json")).categories == {"style": ["paintings", "paintings"]}
    (tmp_path / "bad.json").write_text(json.dumps({"anime": "not a list"}))
    with pytest.raises(UserError, match="bad.json: hpdv2 format is"):
        prompt_sets.read(str(tmp_path / "bad.json"))


def test_parti_tsv_and_drawbench_csv(tmp_path):
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\n"
                     "bond\tAbstract\tBasic\t\n"
                     "A tiger, \"striped\", in snow\tAnimals\tImagination\tsome note\n")
    got = prompt_sets.read(str(parti))
    assert got.prompts == ["bond", 'A tiger, "striped", in snow']
    assert got.categories == {"category": ["Abstract", "Animals"], "challenge": ["Basic", "Imagination"]}
    drawbench = tmp_path / "drawbench.csv"
    drawbench.write_text('\ufeffPrompts,Category\n"A red colored car, parked",Colors\nA cat,Counting\n')
    got = prompt_sets.read(str(drawbench))
    assert got.prompts == ["A red colored car, parked", "A cat"]
    assert got.categories == {"category": ["Colors", "Counting"]}
    (tmp_path / "nohead.csv").write_text("text,kind\na,b\n")
    with pytest.raises(UserError, match=r"nohead.csv: no Prompt or Prompts column in the header \['text', 'kind'\]"):
        prompt_sets.read(str(tmp_path / "nohead.csv"))


def test_rows_jsonl_and_parquet(tmp_path):
    rows = [{"caption": "a dog", "best_image_uid": "x"}, {"caption": "a dog", "best_image_uid": "y"},
            {"caption": "a cat", "best_image_uid": "z"}]
    (tmp_path / "pickapic_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert prompt_sets.read(str(tmp_path / "pickapic_test.jsonl")).prompts == ["a dog", "a cat"]  # once each
    table = pa.table({"prompt": ["p1", "p2"], "category": ["Anime", "Photo"], "image": [b"\x00", b"\x01"]})
    pq.write_table(table, tmp_path / "oip.parquet")
    got = prompt_sets.read(str(tmp_path / "oip.parquet"))
    assert got.prompts == ["p1", "p2"] and got.categories == {"category": ["Anime", "Photo"]}
    assert prompt_sets.read(str(tmp_path / "oip.parquet"), prompt_column="category").prompts == ["Anime", "Photo"]
    with pytest.raises(UserError, match=r"oip.parquet: no prompt column .text. among \[.prompt., .category."):
        prompt_sets.read(str(tmp_path / "oip.parquet"), prompt_column="text")


def test_world_set_and_unknown_formats(tmp_path):
    got = prompt_sets.read("world:heldout")
    assert got.prompts == grammar.prompts("heldout") and set(got.categories) == {"colour", "shape", "count"}
    with pytest.raises(UserError, match=r"world:test: the embedded world's splits are"):
        prompt_sets.read("world:test")
    (tmp_path / "prompts.yaml").write_text("- a\n")
    with pytest.raises(UserError, match=r"prompts.yaml: unknown prompt file format; expected one of"):
        prompt_sets.read(str(tmp_path / "prompts.yaml"))
    with pytest.raises(UserError, match=r"missing.txt: prompt file not found"):
        prompt_sets.read(str(tmp_path / "missing.txt"))


# --- statistics ----------------------------------------------------------------------------------------------

def test_mean_interval_is_students_t_over_prompts():
    scores_PxN = np.random.default_rng(0).normal(size=(40, 3))
    got = stats.mean_interval(scores_PxN)
    ref = scipy_stats.ttest_1samp(scores_PxN.mean(1), 0.0).confidence_interval(0.95)
    np.testing.assert_allclose([got.value, got.low, got.high], [scores_PxN.mean(), ref.low, ref.high], rtol=1e-10)


def test_win_rate_and_its_bootstrap():
    rng = np.random.default_rng(1)
    base_PxN = rng.normal(size=(60, 2))
    model_PxN = base_PxN + rng.normal(0.3, 1.0, size=(60, 2))
    model_PxN[0, 0] = base_PxN[0, 0]  # a tie counts half
    w = stats.wins(model_PxN, base_PxN)
    assert w[0, 0] == 0.5 and set(np.unique(w)) <= {0.0, 0.5, 1.0}
    np.testing.assert_array_equal(stats.wins(model_PxN, base_PxN, higher_is_better=False)[1:], 1 - w[1:])
    got = stats.win_rate(model_PxN, base_PxN, n_resamples=20000)
    ref = scipy_stats.bootstrap((w.mean(1),), np.mean, n_resamples=20000, method="percentile",
                                random_state=0).confidence_interval
    assert got.value == pytest.approx(w.mean())
    assert got.low == pytest.approx(ref.low, abs=0.01) and got.high == pytest.approx(ref.high, abs=0.01)
    same = stats.win_rate(base_PxN, base_PxN)
    assert (same.value, same.low, same.high) == (0.5, 0.5, 0.5)


# --- models and scorers, checked before anything samples --------------------------------------------------

def test_model_kinds(tmp_path):
    assert models.kind(DEMO_BASE) == "transformer"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert models.kind(str(run)) == "run"
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "transformer" / "config.json").write_text("{}")
    assert models.kind(str(pipe)) == "pipeline"
    with pytest.raises(UserError, match=r"model .*nothing: not found; expected a FLUX or SD3 transformer folder"):
        models.kind(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"model .*pipe/transformer: is none of the accepted kinds"):
        models.kind(str(pipe / "transformer"))
    with pytest.raises(UserError, match=r"b=.*run': .*run/checkpoints has no checkpoint \(steps there: \[\]\)"):
        models.parse(f"a={DEMO_BASE},b={run}")
    (run / "checkpoints" / "20").mkdir()
    with pytest.raises(UserError, match=r"has no checkpoint for step 10 \(steps there: \[20\]\)"):
        models.parse(f"b={run}@10")
    specs = models.parse(f"a={DEMO_BASE},b={run}@20")
    assert [(m.name, m.kind, m.step) for m in specs] == [("a", "transformer", None), ("b", "run", 20)]
    with pytest.raises(UserError, match="a name appears twice"):
        models.parse(f"a={DEMO_BASE},a={DEMO_BASE}")
    with pytest.raises(UserError, match="is not NAME=PATH"):
        models.parse(DEMO_BASE)


def test_scorer_checks(tmp_path):
    assert scorers.parse("world_reward,world_fidelity") == [("world_reward", ""), ("world_fidelity", "")]
    with pytest.raises(UserError, match=r"unknown scorer 'blipscore'"):
        scorers.parse("blipscore=x")
    with pytest.raises(UserError, match=r"imagereward=x: missing med_config.json, ImageReward.pt \(or "
                                        r"ImageReward.safetensors\), the BERT tokenizer"):
        scorers.parse("imagereward=x")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"hpsv2=.*: missing open_clip_config.json, open_clip_model.safetensors, "
                                        r"the CLIP tokenizer \(tokenizer.json, or vocab.json \+ merges.txt\) "
                                        r"\(expected a hpsv2 folder"):
        scorers.parse(f"hpsv2={tmp_path}")
    with pytest.raises(UserError, match=r"aesthetic=.*: missing aesthetic_mlp.safetensors, model.safetensors"):
        scorers.parse(f"aesthetic={tmp_path}")
    with pytest.raises(UserError, match="pickscore needs its weights folder"):
        scorers.parse("pickscore")


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    """Was a FileExistsError traceback after the models had loaded (issue 13's probe, evaluate/out_is_file)."""
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match=r"--out=.*taken is a file; evaluate writes"):
        benchmark.run(_opts(tmp_path / "taken"))


# --- the embedded world end to end ---------------------------------------------------------------------------

def _opts(out, **kw) -> benchmark.Options:
    return benchmark.Options(**{**dict(models=f"base={DEMO_BASE},reflow={DEMO_REFLOW},again={DEMO_BASE}",
                                       prompts="world:heldout", out=str(out), scorers="world_reward,world_fidelity",
                                       seeds=2, max_prompts=3, num_steps=3, seed=7, batch_size=4,
                                       show_progress=False), **kw})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    return out, benchmark.run(_opts(out))


def test_demo_results(demo_run):
    out, summary = demo_run
    assert json.loads((out / "results.json").read_text()) == summary
    assert summary["num_prompts"] == 3 and summary["seeds_per_prompt"] == 2 and summary["baseline"] == "base"
    assert set(summary["models"]) == {"base", "reflow", "again"} and set(summary["win_rates"]) == {"reflow", "again"}
    # The same model under two names draws the same images: every comparison is a tie.
    for s in ("world_reward", "world_fidelity"):
        assert summary["win_rates"]["again"][s] == {"value": 0.5, "low": 0.5, "high": 0.5}
        assert summary["models"]["again"][s] == summary["models"]["base"][s]
    assert set(summary["categories"]) == {"colour", "shape", "count"}
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 * 2
    reflow = [r for r in rows if r["model"] == "reflow"]
    assert np.mean([float(r["world_reward"]) for r in reflow]) == pytest.approx(
        summary["models"]["reflow"]["world_reward"]["value"], rel=1e-4)
    md = (out / "results.md").read_text()
    assert "win rate against base" in md and "| reflow |" in md and "world_reward ↑ by shape" in md


def test_demo_images_follow_the_recorded_noise_rule(demo_run):
    """Image k of prompt p is what the world's own seeded sampler draws for p alone from noise index p * N + k."""
    out, _ = demo_run
    cfg, params = base.load_base()
    prompts = grammar.prompts("heldout")[:3]
    for p in (0, 2):
        _, x0 = base.sample_seeded(cfg, params, [prompts[p]] * 2, [p * 2, p * 2 + 1], seed=7, num_steps=3)
        from pnapo_jax.world import latents

        ref = (latents.decode(x0) * 255).round()
        for k in range(2):
            got = np.asarray(sampling.load_png(sampling.image_path(out, "base", p, k))) * 255
            assert np.abs(got - ref[k]).max() <= 1.0  # float rounding at the PNG's quantization boundary
            assert Image.open(sampling.image_path(out, "base", p, k)).text == {  # the file says what it is
                "model": "base", "prompt": prompts[p], "prompt_index": str(p), "seed_index": str(k),
                "noise_index": str(p * 2 + k)}


def test_demo_resumes_without_redoing_or_losing(demo_run):
    out, summary = demo_run
    victim = sampling.image_path(out, "reflow", 1, 1)
    before = victim.read_bytes()
    victim.unlink()
    (out / "images" / "reflow" / ".tmp_123_00001_01.png").write_bytes(b"half a file")  # a killed write
    others = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png") if not p.name.startswith(".")}
    assert benchmark.run(_opts(out)) == summary
    assert victim.read_bytes() == before
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    with pytest.raises(UserError, match=r"benchmark.json: this folder's images were made with seeds=2, not 3"):
        benchmark.run(_opts(out, seeds=3))
    with pytest.raises(UserError, match=r"model\(s\) \['reflow'\] were sampled from other paths"):
        benchmark.run(_opts(out, models=f"base={DEMO_BASE},reflow={DEMO_BASE}"))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _rendered_body(page: pathlib.Path) -> dict[str, int]:
    """The body's data-images-* after Chromium has loaded the page from disk."""
    dom = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    import re

    body = re.search(r"<body([^>]*)>", dom).group(1)
    return {k: int(v) for k, v in re.findall(r'data-images-(\w+)="(\d+)"', body)}


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_html_report_shows_every_image_in_chromium(demo_run, tmp_path):
    out, _ = demo_run
    assert _rendered_body(out / "report.html") == {"total": 3 * 3 * 2, "loaded": 3 * 3 * 2}
    copy = tmp_path / "copy"  # the check sees a missing image
    shutil.copytree(out, copy)
    sampling.image_path(copy, "again", 2, 0).unlink()
    assert _rendered_body(copy / "report.html") == {"total": 18, "loaded": 17}


def test_command_line_errors_are_one_line(tmp_path):
    cases = [(["--prompts=" + str(tmp_path / "p.yaml")], "p.yaml: unknown prompt file format"),
             (["--models=base=" + str(tmp_path)], "is none of the accepted kinds"),
             (["--scorers=clip_score=" + str(tmp_path)], "clip_score=")]
    (tmp_path / "p.yaml").write_text("a\n")
    for extra, message in cases:
        args = [f"--models=base={DEMO_BASE}", "--prompts=world:heldout", f"--out={tmp_path / 'out'}", *extra]
        proc = subprocess.run([sys.executable, "-m", "pnapo_jax.evaluate", *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
