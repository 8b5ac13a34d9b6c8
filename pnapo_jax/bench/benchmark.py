"""The benchmark command's steps, in order: read and check everything (prompt set, models, scorers, the output
folder's record of earlier settings), load the scorers, sample what is missing, score every image file, and
write the results and the report. Nothing samples until every check has passed."""

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pnapo_jax.bench import html_report, models, prompt_sets, results, sampling, scorers
from pnapo_jax.convert import files
from pnapo_jax.errors import UserError

WORLDS = ("demo", "flux")
MANIFEST = "benchmark.json"
SCORE_CHUNK = 32  # images scored at a time (1024 px images are 12 MB each in float32)


@dataclasses.dataclass(frozen=True)
class Options:
    models: str  # NAME=PATH,...
    prompts: str  # a prompt file (prompt_sets) or world:SPLIT
    out: str
    scorers: str  # NAME[=DIR],...
    world: str = "demo"
    pipeline: str = ""  # flux: the folder of text encoders and VAE ("" = the first pipeline among the models)
    seeds: int = 2  # images per prompt
    max_prompts: int = 0  # the set's first N prompts (0: all)
    seed: int = 0  # noise seed
    num_steps: int = 16
    guidance_scale: float | None = None  # flux: None = the pipeline's (FLUX.1's guidance input 3.5, SD3's CFG 7)
    height: int = 1024  # flux
    width: int = 1024  # flux
    max_sequence_length: int = 0  # flux: T5 tokens, 0 = the pipeline's (FLUX 512, SD3 256)
    batch_size: int = 16
    baseline: str = ""  # "" = the first model
    prompt_format: str = ""
    prompt_column: str = ""
    dtype: str = "float32"
    show_progress: bool = True


def _image_settings(opts: Options, prompt_set: prompt_sets.PromptSet, specs: list[models.ModelSpec]) -> dict:
    """What the image files depend on: a rerun into the same folder must agree on all of it."""
    digest = hashlib.sha256("\n".join(prompt_set.prompts).encode()).hexdigest()[:16]
    out = {"world": opts.world, "prompts_sha256": digest, "num_prompts": len(prompt_set.prompts),
           "seeds": opts.seeds, "seed": opts.seed, "num_steps": opts.num_steps,
           "models": {m.name: {"path": m.path if "://" in m.path else str(pathlib.Path(m.path).resolve()),
                               "step": m.step} for m in specs}}
    if opts.world == "flux":
        out |= {"guidance_scale": opts.guidance_scale, "height": opts.height, "width": opts.width,
                "max_sequence_length": opts.max_sequence_length, "dtype": opts.dtype}
    return out


def _check_manifest(out: epath.Path, settings: dict) -> None:
    """Refuse a folder whose images were made otherwise; models may be added, a model's path may not change."""
    path = out / MANIFEST
    if not path.exists():
        return
    old = files.read_json(path)
    for key, value in settings.items():
        if key == "models":
            changed = [m for m, v in value.items() if m in old.get("models", {}) and old["models"][m] != v]
            if changed:
                raise UserError(f"{path}: model(s) {changed} were sampled from other paths or steps "
                                f"({[old['models'][m] for m in changed]}); use another --out or model name")
        elif old.get(key) != value:
            raise UserError(f"{path}: this folder's images were made with {key}={old.get(key)!r}, not {value!r}; "
                            "use another --out (nothing there is overwritten)")


def _pipeline_folder(opts: Options, specs: list[models.ModelSpec]) -> tuple[str, Any]:
    """(--pipeline's folder, default the first pipeline among the models; its pipelines.PipelineKind). Its text
    encoders and VAE serve every model, so every model must be of its backbone: a FLUX-vs-SD3 mix is refused."""
    from pnapo_jax import pipelines

    folder = opts.pipeline or next((m.path for m in specs if m.kind == "pipeline"), "")
    if not folder:
        raise UserError("--world=flux needs --pipeline (a FLUX or SD3 pipeline folder: text encoders, VAE, scheduler) "
                        "or a pipeline folder among --models")
    if models.kind(folder) != "pipeline":
        raise UserError(f"--pipeline={folder}: not a FLUX or SD3 pipeline folder (model_index.json + transformer/)")
    try:
        kind = pipelines.pipeline_kind(folder)
    except UserError as e:
        raise UserError(f"--pipeline={e}") from None
    other = [f"{m.name}={m.path} is {m.backbone}'s" for m in specs if m.backbone != kind.backbone]
    if other:
        raise UserError(f"--models: {'; '.join(other)}, but the pipeline {folder} is a {kind.pipeline_class} "
                        f"({kind.backbone}): one evaluate samples one backbone's models (it shares the pipeline's text "
                        "encoders and VAE); evaluate each backbone's models in its own run with its own --pipeline")
    return folder, kind


def _pipeline_loaders(opts: Options, specs: list[models.ModelSpec], folder: str) -> dict[str, Any]:
    """name -> a function loading its PipelineGenerator; pipelines share the text encoders and VAE of `folder`
    (the models are all of its backbone: `_pipeline_folder`)."""
    import functools

    from pnapo_jax import sample

    options = dict(height=opts.height, width=opts.width, num_steps=opts.num_steps,
                   guidance_scale=opts.guidance_scale, max_sequence_length=opts.max_sequence_length)

    shardings = sampling.eval_mesh().weight_shardings  # the transformers FSDP-sharded as they load

    @functools.cache
    def shared():
        return sample.load_pipeline(folder, dtype=opts.dtype, transformer_shardings=shardings)

    def load(spec: models.ModelSpec) -> sampling.PipelineGenerator:
        if spec.kind == "pipeline" and pathlib.Path(spec.path).resolve() != pathlib.Path(folder).resolve():
            pipeline = sample.load_pipeline(spec.path, dtype=opts.dtype, transformer_shardings=shardings)
            return sampling.PipelineGenerator(pipeline, opts.seed, options)
        if spec.kind == "pipeline":
            return sampling.PipelineGenerator(shared(), opts.seed, options)
        cfg, variables = models.load_transformer(spec, opts.dtype, shardings)
        base = shared()
        base.kind.check_fits(cfg, base.encoders, base.vae)
        pipeline = dataclasses.replace(base, transformer=cfg, variables=variables)
        return sampling.PipelineGenerator(pipeline, opts.seed, options)

    return {m.name: functools.partial(load, m) for m in specs}


def _demo_loaders(opts: Options, specs: list[models.ModelSpec]) -> dict[str, Any]:
    import functools

    from pnapo_jax.world import latents, text

    pipelines = [m for m in specs if m.kind == "pipeline"]
    if pipelines:
        raise UserError(f"--world=demo: {pipelines[0].path} is a {pipelines[0].backbone.upper()} pipeline folder; "
                        "the embedded world takes its "
                        "base (pnapo_jax/assets/demo_base), exported transformers and training workdirs")
    not_flux = [f"{m.name}={m.path}" for m in specs if m.backbone != "flux"]
    if not_flux:  # WorldGenerator runs FLUX's velocity
        raise UserError(f"--world=demo: {', '.join(not_flux)} is an SD3 model; the embedded world's benchmark samples "
                        "FLUX-architecture models")

    def load(spec: models.ModelSpec) -> sampling.WorldGenerator:
        cfg, variables = models.load_transformer(spec, shardings=sampling.eval_mesh().weight_shardings)
        fits = (cfg.in_channels, cfg.joint_attention_dim, cfg.pooled_projection_dim)
        if fits != (latents.IN_CHANNELS, text.TEXT_DIM, text.POOLED_DIM):
            raise UserError(f"model {spec.name}={spec.path}: (in_channels, joint_attention_dim, "
                            f"pooled_projection_dim) = {fits}, the embedded world needs "
                            f"{(latents.IN_CHANNELS, text.TEXT_DIM, text.POOLED_DIM)}")
        return sampling.WorldGenerator(cfg, variables, opts.num_steps, opts.seed)

    return {m.name: functools.partial(load, m) for m in specs}


def _score(out: epath.Path, model: str, P: int, N: int, prompts: list[str],
           loaded: list[scorers.Scorer]) -> dict[str, np.ndarray]:
    """scorer -> [P, N] scores of the model's image files, gathered from the processes that own them (each scores
    its own prompts' images: a process's out folder need not be shared). Every process calls it together."""
    mine = sampling.my_prompts(P)
    items = [(p, k) for p in mine for k in range(N)]
    got = {s.name: [] for s in loaded}
    for start in range(0, len(items), SCORE_CHUNK):
        chunk = items[start:start + SCORE_CHUNK]
        images = np.stack([sampling.load_png(sampling.image_path(out, model, p, k)) for p, k in chunk])
        texts = [prompts[p] for p, _ in chunk]
        for s in loaded:
            got[s.name].append(np.asarray(s.score(images, texts), np.float64))
    out_PxN = {}
    for name, parts in got.items():
        local_PxN = np.full((P, N), np.nan)
        local_PxN[mine] = np.concatenate(parts).reshape(len(mine), N) if parts else np.zeros((0, N))
        if jax.process_count() > 1:  # prompt p's row comes from process p % count
            every = np.asarray(multihost_utils.process_allgather(local_PxN))
            local_PxN = every[np.arange(P) % jax.process_count(), np.arange(P)]
        out_PxN[name] = local_PxN
    return out_PxN


def run(opts: Options) -> dict | None:
    """The benchmark; returns the summary (results.json) on process 0, None elsewhere."""
    if opts.world not in WORLDS:
        raise UserError(f"--world={opts.world!r}: choose from {WORLDS}")
    if opts.seeds < 1 or opts.batch_size < 1 or opts.num_steps < 1 or opts.max_sequence_length < 0:
        raise UserError("--seeds, --batch_size and --num_steps must be at least 1, --max_sequence_length at least 0")
    if epath.Path(opts.out).exists() and not epath.Path(opts.out).is_dir():
        raise UserError(f"--out={opts.out} is a file; evaluate writes its images and report into a folder there")
    prompt_set = prompt_sets.read(opts.prompts, opts.prompt_format, opts.prompt_column)
    if opts.max_prompts:
        prompt_set = dataclasses.replace(prompt_set, prompts=prompt_set.prompts[:opts.max_prompts],
                                         categories={k: v[:opts.max_prompts] for k, v in prompt_set.categories.items()})
    specs = models.parse(opts.models)
    baseline = opts.baseline or specs[0].name
    if baseline not in [m.name for m in specs]:
        raise UserError(f"--baseline={baseline!r} is not among --models' names {[m.name for m in specs]}")
    scorer_specs = scorers.parse(opts.scorers)
    world_scorers = [n for n, _ in scorer_specs if n in scorers.WORLD]
    if opts.world != "demo" and world_scorers:
        raise UserError(f"--scorers: {world_scorers} score the embedded world's images only (--world=demo)")
    if opts.world == "demo":
        loaders = _demo_loaders(opts, specs)
    else:
        folder, kind = _pipeline_folder(opts, specs)
        opts = dataclasses.replace(  # the pipeline's defaults, so the manifest records what the images used
            opts, guidance_scale=kind.guidance_scale if opts.guidance_scale is None else opts.guidance_scale,
            max_sequence_length=opts.max_sequence_length or kind.max_sequence_length)
        loaders = _pipeline_loaders(opts, specs, folder)
    out = epath.Path(opts.out)
    settings = _image_settings(opts, prompt_set, specs)
    _check_manifest(out, settings)
    loaded = [scorers.load(n, p) for n, p in scorer_specs]
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        old = files.read_json(out / MANIFEST) if (out / MANIFEST).exists() else {}
        settings["models"] = {**old.get("models", {}), **settings["models"]}
        sampling.write_whole(out / MANIFEST, (json.dumps(settings, indent=2) + "\n").encode())

    sampling.sample_all(out, loaders, prompt_set.prompts, opts.seeds, opts.batch_size, opts.show_progress)
    P, N = len(prompt_set.prompts), opts.seeds
    scores = {m.name: _score(out, m.name, P, N, prompt_set.prompts, loaded) for m in specs}
    if jax.process_index() != 0:
        return None
    higher = {s.name: s.higher_is_better for s in loaded}
    summary = results.summarize(scores, higher, baseline, prompt_set)
    paths = {m.name: [[str(sampling.image_path(pathlib.Path("."), m.name, p, k)) for k in range(N)]
                      for p in range(P)] for m in specs}
    results.write_csv(out / "scores.csv", scores, prompt_set, paths, opts.seed)
    md = results.write(out, summary)
    html_report.write(out, summary, md, scores, prompt_set, paths)
    return summary
