"""The models a benchmark compares, named on the command line as NAME=PATH, and what each kind of PATH is.

    transformer  a diffusers FluxTransformer2DModel or SD3Transformer2DModel folder (config.json + safetensors):
                 the demo's base (pnapo_jax/assets/demo_base), or `python -m pnapo_jax.export --format=diffusers`
                 output
    pipeline     a diffusers FLUX or SD3 pipeline folder (model_index.json, transformer/, ...): its transformer
    run          a training workdir (config.json + checkpoints/): the latest checkpoint's policy, full or LoRA
                 (a LoRA run's base is rebuilt as training built it); RUN_DIR@STEP picks a step

Each model's backbone (flux or sd3) comes from the file naming it: a run's config.model.backbone, a transformer's
config class, a pipeline's model_index.json. `kind` and `backbone` only read directory listings and those small
JSON files, so every model is checked before anything loads or samples. Runs and
transformer folders may be on gs:// (a pod's training workdir); a pipeline folder must be local (its text encoders
and VAE load from local files).
"""

import dataclasses
import json
import pathlib
from typing import Any

import ml_collections
from etils import epath

from pnapo_jax import backbones, pipelines
from pnapo_jax.convert import layout
from pnapo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    kind: str
    step: int | None = None  # run: the checkpoint step (None: the latest)
    backbone: str = backbones.DEFAULT  # "flux" or "sd3"


def _json(path: epath.Path) -> dict | None:
    """A JSON object file's contents; None for a file that is not one."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def kind(path: str) -> str:
    """Which kind of model folder `path` is ("transformer", "pipeline" or "run"); UserError naming it and what
    was expected otherwise."""
    folder = epath.Path(path)
    if (folder / "checkpoints").is_dir() and (folder / "config.json").is_file():
        return "run"
    if (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file():
        return "pipeline"
    config = folder / "config.json"
    if config.is_file() and any(f.name.endswith(".safetensors") for f in folder.iterdir()):
        if layout.class_backbone((_json(config) or {}).get("_class_name")) is not None:
            return "transformer"
    what = "not found" if not folder.exists() else "is none of the accepted kinds"
    raise UserError(f"model {path}: {what}; expected a FLUX or SD3 transformer folder (config.json of a "
                    "FluxTransformer2DModel or SD3Transformer2DModel + safetensors), a FLUX or SD3 pipeline folder "
                    "(model_index.json + transformer/) or a training workdir (config.json + checkpoints/)")


def backbone(path: str, model_kind: str) -> str:
    """The backbone of the model of `model_kind` at `path`: a run's config.model.backbone (a config without one
    is FLUX's), a pipeline's by its model_index.json class, a transformer's by its config class."""
    folder = epath.Path(path)
    if model_kind == "run":
        config = _json(folder / "config.json")
        if config is None:
            raise UserError(f"model {path}: {folder / 'config.json'} is not a JSON object (a training workdir's "
                            "config)")
        return backbones.backbone_of(ml_collections.ConfigDict(config)).name
    if model_kind == "pipeline":
        return (pipelines.indexed_kind(pathlib.Path(path)) or pipelines.FLUX).backbone
    return layout.class_backbone(_json(folder / "config.json")["_class_name"])


def parse(spec: str) -> list[ModelSpec]:
    """'base=PATH,pnapo=RUN[@STEP],...' -> ModelSpecs, each path checked."""
    out = []
    for item in [s for s in spec.split(",") if s]:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--models: {item!r} is not NAME=PATH")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(f"--models: name {name!r} may hold letters, digits, '_' and '-' only (it names a folder)")
        step = None
        head, at, tail = path.rpartition("@")
        if at and tail.isdigit() and epath.Path(head).is_dir():
            path, step = head, int(tail)
        k = kind(path)
        if k == "pipeline" and "://" in path:
            raise UserError(f"--models: {item!r}: a pipeline folder must be local (its text encoders and VAE load "
                            "from local files); copy it here, or give its transformer/ folder")
        if step is not None and k != "run":
            raise UserError(f"--models: {item!r}: @STEP is for training workdirs, {path} is a {k} folder")
        if k == "run":
            steps = sorted(int(d.name) for d in (epath.Path(path) / "checkpoints").iterdir() if d.name.isdigit())
            if not steps or (step is not None and step not in steps):
                raise UserError(f"--models: {item!r}: {path}/checkpoints has no checkpoint "
                                f"{'' if step is None else f'for step {step} '}(steps there: {steps})")
        out.append(ModelSpec(name, path, k, step, backbone(path, k)))
    names = [m.name for m in out]
    if not out:
        raise UserError("--models: no models given (NAME=PATH,...)")
    if len(set(names)) < len(names):
        raise UserError(f"--models: a name appears twice: {names}")
    return out


def load_transformer(spec: ModelSpec, dtype: str = "float32", shardings: Any = None) -> tuple[Any, dict[str, Any]]:
    """(model config, variables {"params", "lora"?}) of the model's transformer (its backbone's: FluxConfig or
    SD3Config); `shardings` (config -> variable shardings) places a transformer or pipeline folder's weights
    straight into them (a run's come on its training mesh)."""
    import dataclasses as dc

    import jax

    from pnapo_jax import sample

    if spec.kind == "run":
        cfg, variables = sample.checkpoint_policy(spec.path, spec.step, spec.backbone)
        variables = jax.tree.map(lambda x: x.astype(dtype), variables)
    else:
        cfg, params = pipelines.BY_BACKBONE[spec.backbone].load_placed_transformer(spec.path, dtype, shardings)
        variables = {"params": params}
    return dc.replace(cfg, dtype=dtype, param_dtype=dtype), variables
