"""The config checked as a whole before any work starts, and what a resumed run may change of it.

Every problem is reported in one line that names the field (`config.train.num_steps`) and what it allows, so a
mistake costs seconds instead of a failed job after pair generation or weight loading.
"""

import json
import logging
from collections.abc import Callable
from typing import Any

import ml_collections
from etils import epath

from pnapo_jax import backbones, flow, objective, sharding
from pnapo_jax import config as config_lib
from pnapo_jax.backbones.interface import DTYPES, field_problems, get, name_list
from pnapo_jax.data.batch import NOISE_MODES
from pnapo_jax.data.schema import ON_BAD_RECORD
from pnapo_jax.errors import UserError

# The generic fields' checks; config.model's own fields are the backbone's (Backbone.config_problems).
ENUMS = {
    "pnapo.noise_mode": NOISE_MODES,
    "pnapo.scale_convention": tuple(objective.SCALE_CONVENTIONS),
    "pnapo.objective": objective.OBJECTIVES,
    "optim.schedule": config_lib.SCHEDULES,
    "optim.mu_dtype": ("", *DTYPES),
    "optim.grad_dtype": ("", "bfloat16"),
    "model.reference_dtype": DTYPES,
    "t_sampling.kind": flow.T_KINDS,
    "data.source": config_lib.DATA_SOURCES,
    "data.on_bad_record": ON_BAD_RECORD,
    "generate.world": config_lib.WORLDS,
    "generate.pairs": config_lib.PAIR_MODES,
}
# field -> (lowest allowed, whether the lowest itself is allowed)
MINIMA = {
    "seed": (0, True),
    "train.num_steps": (1, True), "train.global_batch_size": (1, True), "train.grad_accum_steps": (1, True),
    "train.log_every": (1, True), "train.eval_every": (0, True), "train.eval_batches": (1, True),
    "train.ema_decay": (0, True),
    "checkpoint.every_steps": (1, True), "checkpoint.keep": (1, True),
    "lora.rank": (0, True), "lora.alpha": (0, True),
    "pnapo.beta": (0, False), "pnapo.n1": (0, True), "pnapo.num_t_buckets": (1, True), "pnapo.sft_weight": (0, True),
    "optim.lr": (0, True), "optim.warmup_steps": (0, True), "optim.b1": (0, True), "optim.b2": (0, True),
    "optim.eps": (0, False), "optim.weight_decay": (0, True), "optim.grad_clip": (0, True),
    "t_sampling.logit_std": (0, False), "t_sampling.mode_scale": (0, True), "t_sampling.grid_size": (1, True),
    "data.latent_h_tokens": (1, True), "data.latent_w_tokens": (1, True), "data.text_len": (1, True),
    "data.synthetic_num": (1, True), "data.worker_count": (0, True),
    "generate.images_per_prompt": (2, True), "generate.num_steps": (1, True), "generate.min_gap": (0, True),
    "generate.prompts_per_batch": (1, True), "generate.prompts_per_chunk": (1, True),
    "generate.max_prompts": (0, True), "generate.eta": (0, True), "train.regenerate_every": (0, True),
    "eval.sample_every": (0, True), "eval.num_prompts": (1, True), "eval.samples_per_prompt": (1, True),
    "eval.num_steps": (1, True), "eval.batch_size": (1, True),
}
# What a resume may not change: the saved state would not fit it, or it would silently train something else
# (with the backbone's own config.model fields, Backbone.resume_fixed).
RESUME_FIXED = ("seed", "model.backbone", "lora.rank", "lora.alpha", "lora.targets", "train.global_batch_size",
                "data.source", "data.latent_h_tokens", "data.latent_w_tokens", "data.text_len",
                "train.regenerate_every")


def _problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every problem of the device-independent fields, each naming its field and what it allows."""
    backbone = backbones.backbone_of(config)
    out = field_problems(config, ENUMS, MINIMA) + backbone.config_problems(config)
    t, p = config.train, config.pnapo
    if t.global_batch_size % max(t.grad_accum_steps, 1):
        out.append(f"config.train.global_batch_size={t.global_batch_size} must divide by "
                   f"config.train.grad_accum_steps={t.grad_accum_steps}")
    if p.use_gap and p.tau <= 0:
        out.append(f"config.pnapo.tau is {p.tau}; it must be > 0 with config.pnapo.use_gap")
    if p.ref_cache and (p.noise_mode != "recorded" or config.t_sampling.kind != "grid"):
        out.append(f"config.pnapo.ref_cache needs config.pnapo.noise_mode='recorded' and config.t_sampling.kind="
                   f"'grid' (then the reference's errors depend only on the record and t); got {p.noise_mode!r}, "
                   f"{config.t_sampling.kind!r}")
    g = config.generate
    if isinstance(g.eta, int | float) and g.eta > 1:
        out.append(f"config.generate.eta is {g.eta}; it must be in [0, 1] (the share of fresh noise per step)")
    if g.shared_noise and not g.eta:
        out.append("config.generate.shared_noise needs config.generate.eta > 0: from one noise the ODE sampler "
                   "makes K identical images")
    if t.regenerate_every and config.data.source == "synthetic":
        out.append("config.train.regenerate_every needs a world to sample pairs from: config.data.source "
                   "'generate' or 'array_record', not 'synthetic'")
    if t.regenerate_every and p.ref_cache:
        out.append("config.pnapo.ref_cache caches one dataset's reference errors; config.train.regenerate_every "
                   "makes new pairs each round: use one of them")
    if config.optim.grad_dtype and config.optim.grad_dtype != config.model.dtype:
        out.append(f"config.optim.grad_dtype={config.optim.grad_dtype!r} needs config.model.dtype="
                   f"{config.optim.grad_dtype!r} (the dtype the weights are used in), got {config.model.dtype!r}")
    if p.use_schedule and p.n2 <= p.n1:
        out.append(f"config.pnapo.n2={p.n2} must be > config.pnapo.n1={p.n1} with config.pnapo.use_schedule")
    for k in ("optim.b1", "optim.b2", "train.ema_decay"):
        if isinstance(get(config, k), int | float) and get(config, k) >= 1:
            out.append(f"config.{k} is {get(config, k)}; it must be < 1")
    if config.eval.sample_every > 0 and config.generate.world == "demo":
        from pnapo_jax.world import grammar

        if config.eval.split not in grammar.SPLITS:
            out.append(f"config.eval.split is {config.eval.split!r}; the demo world's splits: {grammar.SPLITS}")
    out += _mesh_problems(config.mesh)
    if not out and config.lora.rank > 0:
        out += _lora_target_problems(config, backbone)
    return out


def _path_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Local paths (absolute, ~ or ./) that do not exist: hub ids and gs:// paths are checked where they load."""
    fields = ["model.pretrained", "data.eval_path"] + ["data.path"] * (config.data.source == "array_record")
    fields += ["generate.pipeline", "generate.reward_path"] * (config.generate.world == "flux")
    local = lambda p: p.startswith(("/", "~", "./", "../"))
    empty = ["config.data.path is empty; config.data.source='array_record' reads a dataset from it"]
    empty *= config.data.source == "array_record" and not config.data.path
    return empty + [f"config.{k}={get(config, k)}: no such file or folder" for k in fields
            if get(config, k) and local(get(config, k)) and not epath.Path(get(config, k)).expanduser().exists()]


def _mesh_problems(mesh: ml_collections.ConfigDict) -> list[str]:
    sizes = {a: mesh[a] for a in sharding.MESH_AXES}
    bad = [a for a, s in sizes.items() if isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1)]
    if bad or list(sizes.values()).count(-1) > 1:
        return [f"config.mesh {sizes}: each axis is a size >= 1, or -1 (at most one) for the devices left"]
    return []


def _lora_target_problems(config: ml_collections.ConfigDict, backbone: backbones.Backbone) -> list[str]:
    targets = name_list(config.lora.targets)
    if not targets:
        return ["config.lora.targets is empty; config.lora.rank > 0 needs layer names (e.g. to_q,to_k,to_v)"]
    names = backbone.lora_layer_names(config)
    unknown = sorted(set(targets) - names)
    if unknown:
        return [f"config.lora.targets: no layer is named {', '.join(unknown)}; Dense layers that take adapters: "
                f"{', '.join(sorted(names))}"]
    return []


def check(config: ml_collections.ConfigDict, num_devices: int | None = None, paths: bool = False) -> None:
    """Raise a UserError naming every bad field of `config`; with `num_devices`, also the mesh and batch that do
    not fit them, with `paths` the local inputs that do not exist (the commands that read them: train,
    generate; not export, which needs no data). A config that lacks fields is refused first, naming them."""
    check_complete(config, "the config")
    problems = _problems(config) + (_path_problems(config) if paths else [])
    if not problems and num_devices is not None:
        problems = _device_problems(config, num_devices)
    if problems:
        raise UserError("; ".join(problems))


# Fields added after runs were first saved. A saved config without one ran with the behaviour its default keeps
# (the feature off), so readers of older workdirs (export, sample, evaluate) fill it in rather than refuse the run.
ADDED_FIELDS = ("train.ema_decay", "pnapo.objective", "pnapo.sft_weight", "pnapo.ref_cache", "pnapo.ref_cache_dir",
                "t_sampling.grid_size", "generate.eta", "generate.shared_noise", "train.regenerate_every",
                "optim.mu_dtype", "optim.grad_dtype")


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (a saved run's, unlocked) with every ADDED_FIELDS field it lacks set to its default."""
    defaults = config_lib.defaults(backbones.backbone_of(config).config_class)
    for key in ADDED_FIELDS:
        section, name = key.split(".")
        if section in config and name not in config[section]:
            config[section][name] = defaults[section][name]
    return config


def check_complete(config: ml_collections.ConfigDict, source: str) -> None:
    """Refuse a config (read from `source`, e.g. a workdir's config.json) that lacks fields, naming them."""
    backbone = backbones.backbone_of(config)
    required = set(_flat(config_lib.defaults(backbone.config_class))) - {"model.backbone"}
    missing = sorted(required - set(_flat(config)))  # configs saved before backbones had names are FLUX's
    whose = "" if backbone.name == backbones.DEFAULT else f" with config.model.backbone={backbone.name!r}"
    if missing:
        raise UserError(f"{source} lacks the fields {', '.join('config.' + k for k in missing[:6])}"
                        f"{' ...' if len(missing) > 6 else ''}: it is not a pnapo_jax run's config{whose}")


def _device_problems(config: ml_collections.ConfigDict, num_devices: int) -> list[str]:
    try:
        data, fsdp, _ = sharding.mesh_shape(config.mesh, num_devices)
    except UserError as e:  # sharding names config.mesh and the device count
        return [str(e)]
    t = config.train
    if t.global_batch_size % (data * fsdp):
        return [f"config.train.global_batch_size={t.global_batch_size} must divide by the data x fsdp devices "
                f"= {data} x {fsdp} = {data * fsdp} (config.mesh)"]
    return []


def _flat(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """{"train.num_steps": 1000, ...}; tuples as lists, as config.json holds them."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict | ml_collections.ConfigDict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume(config: ml_collections.ConfigDict, workdir: str | epath.Path,
                 log: Callable[[str], None] = logging.warning) -> None:
    """Before a run resumes in `workdir`: refuse a config whose RESUME_FIXED fields differ from the saved
    config.json in one line naming them; report the other changes (num_steps, lr, intervals) with `log`."""
    workdir = epath.Path(workdir)
    saved_path, checkpoints = workdir / "config.json", workdir / "checkpoints"
    if not (saved_path.exists() and checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        return  # nothing to resume
    try:
        saved = _flat(json.loads(saved_path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{saved_path} is not JSON ({e}); it records the run being resumed") from None
    now = _flat(json.loads(config.to_json_best_effort()))
    normal = lambda k, v: list(name_list(v)) if k == "lora.targets" and v is not None else v
    changed = {k: (saved[k], now[k]) for k in saved.keys() & now.keys() if normal(k, saved[k]) != normal(k, now[k])}
    fixed = {k: v for k, v in changed.items() if k in RESUME_FIXED + backbones.backbone_of(config).resume_fixed}
    if (saved.get("optim.grad_clip", 0) > 0) != (now["optim.grad_clip"] > 0):  # another optimizer state tree
        fixed["optim.grad_clip"] = (saved.get("optim.grad_clip"), now["optim.grad_clip"])
    if (saved.get("train.ema_decay", 0) > 0) != (now["train.ema_decay"] > 0):  # a state with or without the EMA
        fixed["train.ema_decay"] = (saved.get("train.ema_decay", 0.0), now["train.ema_decay"])
    if fixed:
        raise UserError(f"{workdir} holds a run whose checkpoints do not fit this config: "
                        + ", ".join(f"config.{k} was {a!r}, now {b!r}" for k, (a, b) in sorted(fixed.items()))
                        + "; restore those values, or train into a new --workdir")
    if changed:
        log("resuming with a changed config: " + ", ".join(f"config.{k} {a!r} -> {b!r}"
                                                            for k, (a, b) in sorted(changed.items())))
