"""The run's pretrained weights: export cannot write over them (or the workdir), and a resume whose weights
changed since the first start is refused in one line (the frozen reference would silently be another)."""

import json
import os
import re
import shutil
import sys

import huggingface_hub
import jax
import numpy as np
import pytest
from etils import epath

from pnapo_jax import convert, export, ref_cache, reference, train
from pnapo_jax.errors import UserError
from pnapo_jax.setup import base_params, init_state, make_setup

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def _config(pretrained: str, num_steps: int):
    config = tiny.get_config()
    config.train.num_steps, config.train.eval_every, config.checkpoint.every_steps = num_steps, 0, 1
    config.model.pretrained = pretrained
    return config


def _save_weights(config, folder, seed: int) -> None:
    """Random weights for the tiny model as a diffusers pipeline folder (transformer/ inside)."""
    setup = make_setup(config, jax.devices()[:1])
    abstract = setup.abstract_variables["params"]
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.02).astype(s.dtype), abstract)
    convert.save_diffusers_transformer(setup.model_cfg, params, epath.Path(folder) / "transformer")


def test_resume_refuses_changed_pretrained_weights(tmp_path):
    base = tmp_path / "base"
    config = _config(str(base), 1)
    _save_weights(config, base, seed=0)
    run = tmp_path / "run"
    train.train_and_evaluate(config, str(run), devices=jax.devices()[:1], show_progress=False)
    record = run / reference.FINGERPRINT_NAME
    assert json.loads(record.read_text())["source"] == str(base)

    # The same weights elsewhere (a copy) resume: the fingerprint is their content, not their path.
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    reference.check_or_record(_config(str(copy), 2), str(run), resuming=True)

    # Overwritten weights (what `export --out=<base>` did): same files, same sizes, other values.
    _save_weights(config, base, seed=1)
    weights = base / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError, match=re.escape(
            f"the pretrained weights (config.model.pretrained={str(base)!r}) changed since this run started: "
            f"diffusion_pytorch_model.safetensors changed (size {weights.stat().st_size} -> "
            f"{weights.stat().st_size}, content differs); ") + r".*delete .*pretrained_fingerprint\.json and resume"):
        train.train_and_evaluate(_config(str(base), 2), str(run), devices=jax.devices()[:1], show_progress=False)
    assert int(max(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())) == 1  # nothing trained

    # The way out the message gives: delete the record; the resume then records the new weights.
    record.unlink()
    train.train_and_evaluate(_config(str(base), 2), str(run), devices=jax.devices()[:1], show_progress=False)
    assert json.loads(record.read_text()) == reference.fingerprint(_config(str(base), 2).model)


def test_fingerprint_names_a_moved_hub_revision(tmp_path, monkeypatch):
    """A hub id's fingerprint holds the snapshot's revision; a new revision is named as such."""
    config = _config("someone/flux", 1)
    old, new = "a" * 40, "b" * 40
    for revision in (old, new):
        _save_weights(config, tmp_path / "models--someone--flux" / "snapshots" / revision, seed=0)
    revision = {"now": old}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(
        tmp_path / "models--someone--flux" / "snapshots" / revision["now"]))
    reference.check_or_record(config, str(tmp_path / "run"), resuming=False)
    revision["now"] = new
    with pytest.raises(UserError, match=f"hub revision {old} -> {new}; the resumed run"):
        reference.check_or_record(config, str(tmp_path / "run"), resuming=True)


@pytest.mark.parametrize("out", ["base", "base/transformer", "base/transformer/sub", "run", "run/checkpoints",
                                 "run/checkpoints/1", "hub/models--someone--flux/snapshots/x/transformer"])
def test_export_refuses_to_write_over_the_runs_inputs(tmp_path, monkeypatch, out):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pretrained = "someone/flux" if out.startswith("hub/") else str(tmp_path / "base")
    (tmp_path / "base").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(_config(pretrained, 1).to_json_best_effort())
    with pytest.raises(UserError, match=rf"^--out={re.escape(str(tmp_path / out))} would write over "):
        export.export(str(tmp_path / "run"), str(tmp_path / out), "diffusers")
    # A folder inside the workdir other than its checkpoints is a fine place for an export.
    reference.refuse_overwrite(str(tmp_path / "run" / "exported"), _config(pretrained, 1), str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == ["config.json"]


def test_seeded_init_resumes_and_a_switch_to_pretrained_is_named(tmp_path):
    run = str(tmp_path / "run")
    reference.check_or_record(_config("", 1), run, resuming=False)
    reference.check_or_record(_config("", 2), run, resuming=True)  # nothing to compare: no weights files
    _save_weights(_config("", 1), tmp_path / "base", seed=0)
    with pytest.raises(UserError, match=re.escape(f"source 'the seeded init' -> {str(tmp_path / 'base')!r}")):
        reference.check_or_record(_config(str(tmp_path / "base"), 2), run, resuming=True)


def test_reference_error_cache_follows_the_weights_content_not_their_path(tmp_path):
    """The cache of the reference's errors (pnapo_jax/ref_cache.py) depends on the weights, not where they lie: the
    same weights copied elsewhere (another clone's embedded base, a new install) reuse it; other weights at the
    same path are refused."""
    def cache(pretrained: str, lines: list[str]) -> dict[str, np.ndarray]:
        config = _config(pretrained, 1)
        config.t_sampling.kind, config.t_sampling.grid_size, config.pnapo.ref_cache = "grid", 2, True
        config.data.synthetic_num = 8
        setup = make_setup(config, jax.devices()[:1])
        _, frozen = init_state(setup, base_params(setup))
        return ref_cache.load_or_build(config, setup, frozen, train.make_source(config, ""), "", tmp_path / "run",
                                       lines.append)

    base, copy = tmp_path / "base", tmp_path / "copy"
    _save_weights(_config(str(base), 1), base, seed=0)
    shutil.copytree(base, copy)
    built, lines = cache(str(base), []), []
    assert cache(str(copy), lines).keys() == built.keys() and lines == []  # read back, nothing computed again
    _save_weights(_config(str(base), 1), base, seed=1)
    with pytest.raises(UserError, match=r"holds reference errors for another setup \(differs in weights\)"):
        cache(str(base), [])
