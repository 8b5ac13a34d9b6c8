"""A training checkpoint -> weights that inference tools load.

    python -m pnapo_jax.export --workdir=DIR [--step=N] --out=OUT --format=diffusers|bfl|lora

The formats are the run's backbone's (Backbone.save_formats) and lora. FLUX: diffusers, a `FluxTransformer2DModel`
folder; bfl, one original-layout .safetensors file (BFL's code, ComfyUI); lora (LoRA runs only): a folder holding
`pytorch_lora_weights.safetensors` for `FluxPipeline.load_lora_weights`.
A LoRA run exported as diffusers or bfl is its base with the adapters merged in; the base is rebuilt as
training rebuilt it (config.model.pretrained, or the seeded init), since checkpoints never hold it.
"""

import json
from typing import Any

import ml_collections
from absl import flags
from etils import epath

from pnapo_jax import backbones, cli, config_check, reference
from pnapo_jax.checkpoint import Checkpointer
from pnapo_jax.errors import UserError
from pnapo_jax.setup import Setup, base_params, make_setup

LORA = "lora"  # the adapters alone, whatever the backbone


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config, with a mesh that fits whatever devices export runs on (one fsdp axis over all)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"{path} not found: --workdir must be a training workdir")
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON ({e}): --workdir must be a training workdir") from None
    config_check.check_complete(config_check.with_added_fields(config), str(path))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    return config


def restore_params(setup: Setup, workdir: str, step: int | None = None) -> tuple[int, Any]:
    """(step, trained params) of a checkpoint, default the newest that restores: their EMA when the run kept one
    (config.train.ema_decay > 0), as its sampling evals used; optimizer state is not read.
    The workdir is only read (a run may be training in it): nothing there is deleted or written."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        raise UserError(f"no checkpoints: {directory} not found")
    ckpt = Checkpointer(str(directory), setup.config.checkpoint, handle_sigterm=False, read_only=True)
    try:
        steps = ckpt.all_steps()
        if step is not None and step not in steps:
            raise UserError(f"no checkpoint for step {step} in {directory}; available steps: {steps}")
        return ckpt.restore_params(step, setup.abstract_params, setup.evaluated_key)
    finally:
        ckpt.close()


def export(workdir: str, out: str, fmt: str, step: int | None = None, devices: list | None = None) -> int:
    """Write checkpoint `step` (default: the latest) of `workdir` to `out` as `fmt`; returns the step."""
    config = load_config(workdir)
    backbone = backbones.backbone_of(config)
    formats = (*backbone.save_formats, LORA)
    if fmt not in formats:
        raise UserError(f"--format={fmt}: a {backbone.name} run exports as {', '.join(formats)}")
    if fmt in backbone.single_file_formats and not out.endswith(".safetensors"):  # named for the tools that load it
        out += ".safetensors"
    reference.refuse_overwrite(out, config, workdir)
    setup = make_setup(config, devices)
    if fmt == LORA and not setup.lora:
        raise UserError(f"--format=lora: {workdir} is a full fine-tune (config.lora.rank=0): it has no adapters; "
                         "export it with --format=diffusers or --format=bfl")
    step, params = restore_params(setup, workdir, step)
    print(f"restored step {step} from {workdir}", flush=True)
    cfg = setup.model_cfg
    if fmt == LORA:
        backbone.save_lora(cfg, params, out)
    else:
        if setup.lora:
            print("rebuilding the base weights to merge the adapters into", flush=True)
            params = backbone.merge_lora(cfg, base_params(setup), params)
        backbone.save(cfg, params, out, fmt)
    print(f"wrote {fmt} to {out}", flush=True)
    return step


def _main(argv: list[str]) -> None:
    f = flags.FLAGS
    if f.step is not None and f.step < 0:
        raise UserError(f"--step={f.step}: checkpoint steps are >= 0")
    export(f.workdir, f.out, f.format, f.step)


def run() -> None:
    """The CLI. Flags are defined here, not at import, so that importing this module next to
    `pnapo_jax.main` (which also has --workdir) does not clash."""
    flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_string("out", None, "Output folder (diffusers, lora) or .safetensors file (bfl; the suffix is "
                        "appended when missing).")
    flags.DEFINE_string("format", "diffusers", "What to write: one of the run's backbone's formats (FLUX: "
                        "diffusers, bfl) or lora.")
    flags.mark_flags_as_required(["workdir", "out"])
    cli.run(_main)


if __name__ == "__main__":
    run()
