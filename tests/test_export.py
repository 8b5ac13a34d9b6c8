"""Export of tiny training runs: diffusers and BFL checkpoints, and LoRA files that diffusers itself loads.

One test per training run, so that pytest-xdist never trains the same run on two workers.
"""

import dataclasses
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from etils import epath
from flax import traverse_util
from flux_testing import random_inputs, torch_forward, unscan_params

from pnapo_jax import checkpoint, convert, export, train
from pnapo_jax.errors import UserError
from pnapo_jax.models import flux
from pnapo_jax.setup import Setup, base_params, make_setup

ROOT = epath.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "configs"))
import tiny  # noqa: E402


def _train(workdir: epath.Path, variant: str = "") -> Setup:
    """Two steps on one device, a checkpoint after each; the setup export rebuilds from config.json."""
    config = tiny.get_config(variant)
    config.train.num_steps, config.train.eval_every, config.checkpoint.every_steps = 2, 0, 1
    config.optim.warmup_steps = 0  # lr 0 at step 0 would leave the LoRA adapters at B = 0
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], show_progress=False)
    return make_setup(export.load_config(str(workdir)), jax.devices()[:1])


def _checkpoint_params(setup: Setup, workdir: epath.Path, step: int = 2):
    """The trained params as training restores them (the whole train state), independently of export."""
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), setup.config.checkpoint)
    state = ckpt.restore(step, setup.abstract_state, None)
    ckpt.close()
    return jax.device_get(state["params"])


def _forward(setup: Setup, variables: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs, our model's output) on a fixed random batch."""
    inputs = random_inputs(setup.model_cfg, batch=2, h=4, w=4, txt_len=8)
    return inputs, np.asarray(jax.jit(flux.FluxTransformer(setup.model_cfg).apply)(variables, **inputs))


def _assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    err = np.abs(actual - expected).max() / np.abs(expected).max()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def test_full_finetune_to_diffusers_and_bfl(tmp_path):
    run = tmp_path / "run"
    setup = _train(run)
    # All 8 devices here, where training used one: restoring must not depend on the training mesh.
    assert export.export(str(run), str(tmp_path / "diffusers"), "diffusers") == 2
    inputs, ours = _forward(setup, {"params": _checkpoint_params(setup, run)})
    _assert_close(torch_forward(FluxTransformer2DModel.from_pretrained(tmp_path / "diffusers"), inputs), ours)

    # The CLI, on 2 devices: BFL at an earlier step, bit-exact, named .safetensors though --out lacks it;
    # a missing step fails naming the available ones.
    cmd = [sys.executable, "-m", "pnapo_jax.export", f"--workdir={run}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    bfl = tmp_path / "flux.safetensors"
    ok = subprocess.run([*cmd, f"--out={tmp_path / 'flux'}", "--format=bfl", "--step=1"], capture_output=True,
                        text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert bfl.exists() and not (tmp_path / "flux").exists() and str(bfl) in ok.stdout
    umask = os.umask(0o022)
    os.umask(umask)
    for file in [bfl, *(tmp_path / "diffusers").iterdir()]:  # as any file the user writes, not 0600
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    loaded = convert.load_bfl_transformer(bfl, setup.model_cfg)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), _checkpoint_params(setup, run, step=1))
    bad = subprocess.run([*cmd, f"--out={tmp_path / 'bad'}", "--step=7"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0
    assert "no checkpoint for step 7" in bad.stderr and "available steps: [1, 2]" in bad.stderr, bad.stderr


def test_lora_file_loads_into_diffusers_and_merged_export_matches(tmp_path):
    run = tmp_path / "run"
    setup = _train(run, "lora")
    cfg, lora = setup.model_cfg, _checkpoint_params(setup, run)
    assert max(np.abs(b).max() for p, b in traverse_util.flatten_dict(lora).items() if p[-1] == "lora_b") > 0
    base = jax.device_get(base_params(setup))
    inputs, policy = _forward(setup, {"params": base, "lora": lora})

    export.export(str(run), str(tmp_path / "lora"), "lora")
    convert.save_diffusers_transformer(cfg, base, tmp_path / "base")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None,
                        transformer=FluxTransformer2DModel.from_pretrained(tmp_path / "base"))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    _assert_close(torch_forward(pipe.transformer, inputs), policy)

    export.export(str(run), str(tmp_path / "merged"), "diffusers")
    _assert_close(torch_forward(FluxTransformer2DModel.from_pretrained(tmp_path / "merged"), inputs), policy)

    # A scan_layers run stacks its adapters: the LoRA file and the merge come out the same.
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    per_layer = convert.lora.lora_state_dict(cfg, lora)
    scanned = convert.lora.lora_state_dict(scanned_cfg, flux.scan_params(lora, cfg))
    assert scanned.keys() == per_layer.keys()
    jax.tree.map(np.testing.assert_array_equal, scanned, per_layer)
    merged = convert.merge_lora(scanned_cfg, flux.scan_params(base, cfg), flux.scan_params(lora, cfg))
    jax.tree.map(np.testing.assert_array_equal, unscan_params(merged, cfg), convert.merge_lora(cfg, base, lora))


def test_clear_errors_before_any_restore(tmp_path):
    with pytest.raises(UserError, match="config.json not found"):
        export.export(str(tmp_path / "missing"), str(tmp_path / "out"), "diffusers")
    (tmp_path / "config.json").write_text(tiny.get_config().to_json_best_effort())
    with pytest.raises(UserError, match="full fine-tune"):
        export.export(str(tmp_path), str(tmp_path / "out"), "lora")
    with pytest.raises(UserError, match="checkpoints not found"):
        export.export(str(tmp_path), str(tmp_path / "out"), "bfl")
