"""A weights folder whose config.json is valid but whose tensors do not match it (one tensor dropped, renamed or
reshaped), given to the commands: exit status 1 and one stderr line `error: ...` naming the folder or file, the
tensor and what was expected; no traceback (before the fix: a ValueError traceback)."""

import os
import subprocess
import sys

import pytest
from cli_probe import MISMATCHES, _tiny_weights, mismatched
from etils import epath

ROOT = epath.Path(__file__).parent.parent
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
           HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _expected_words(case: str, key: str, shape: tuple[int, ...]) -> list[str]:
    """What the line must say beyond the folder: the tensor, what was expected of it, how many are amiss."""
    if case == "dropped":
        return [f"missing tensors (1): {key}"]
    if case == "renamed":
        return [f"missing tensors (1): {key}", f"unexpected tensors (1): {key}_renamed"]
    return [f"wrong shapes (1): {key}", f"expected {shape}, found {(shape[0] + 1, *shape[1:])}"]


def _one_error_line(args: list[str], cwd: epath.Path) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], env=ENV, cwd=str(cwd), capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (
        proc.returncode, proc.stderr[-3000:])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> epath.Path:
    """configs/tiny.py's transformer as a diffusers folder."""
    folder = epath.Path(tmp_path_factory.mktemp("tiny")) / "weights"
    _tiny_weights(str(folder))
    return folder


@pytest.mark.parametrize("case", MISMATCHES)
def test_main_pretrained_folder(tmp_path, tiny_weights, case):
    folder = epath.Path(tmp_path) / case
    key, shape = "proj_out.bias", (16,)
    mismatched(str(tiny_weights), str(folder), case, key)
    line = _one_error_line(["pnapo_jax.main", f"--config={ROOT / 'configs' / 'tiny.py'}",
                            f"--workdir={tmp_path / 'run'}", "--noprogress", "--config.train.num_steps=2",
                            f"--config.model.pretrained={folder}"], ROOT)
    assert str(folder) in line, line
    for word in _expected_words(case, key, shape):
        assert word in line, (word, line)


def test_sample_pipeline_folder(tmp_path):
    """The demo base as --pipeline, one tensor of it renamed."""
    folder = epath.Path(tmp_path) / "demo"
    key = "proj_out.weight"
    mismatched(str(ROOT / "pnapo_jax" / "assets" / "demo_base"), str(folder), "renamed", key)
    line = _one_error_line(["pnapo_jax.sample", f"--pipeline={folder}", "--prompt=a red cube",
                            f"--out={tmp_path / 'out.png'}"], ROOT)
    assert str(folder) in line, line
    for word in _expected_words("renamed", key, ()):
        assert word in line, (word, line)
    assert not (epath.Path(tmp_path) / "out.png").exists()
