"""Every config field with its default and meaning. Config files in configs/ start here and override.

Sweep any field from the command line: `--config.pnapo.beta=5000 --config.optim.lr=2e-6`.
"""

import dataclasses
import types
import typing

import ml_collections

from pnapo_jax import backbones
from pnapo_jax.objective import LossConfig

# Logical axis -> mesh axes. Parameters are FSDP-sharded on their `embed` dimension and tensor-parallel on
# heads / mlp / modulation; activations are batch-sharded over (data, fsdp).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("adapter", "fsdp"),  # LoRA adapters' other feature dimension, where it divides: none whole on every chip
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("mod", "tensor"),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
    ("latent", None),
    ("text_in", None),
    ("cond_in", None),
    ("embed_out", None),
    ("norm", None),
)


# The allowed values of the enum fields that no lower module defines (pnapo_jax.config_check checks them all).
SCHEDULES = ("constant", "cosine")
DATA_SOURCES = ("synthetic", "array_record", "generate")
WORLDS = ("demo", "flux")
PAIR_MODES = ("best_worst", "all_above_gap")


def parse_variants(arg: str, allowed: tuple[str, ...], config_file: str) -> list[str]:
    """`configs/x.py:a,b` -> ["a", "b"], refusing variants the file does not define."""
    variants = [v for v in arg.split(",") if v]
    unknown = set(variants) - set(allowed)
    if unknown:
        raise ValueError(f"{config_file}: unknown variants {sorted(unknown)}; choose from {allowed}")
    return variants


def model_fields(model_config: type) -> ml_collections.ConfigDict:
    """config.model's fields from a backbone's model config dataclass: its non-`lora_` fields with their defaults.
    A None default keeps its annotated type (`int | None`) so that `--config.model.x=3` can set it."""
    hints = typing.get_type_hints(model_config)
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(model_config):
        if f.name.startswith("lora_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default is None:
            types_ = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
            if len(types_) != 1 or typing.get_origin(hints[f.name]) not in (typing.Union, types.UnionType):
                raise TypeError(f"{model_config.__name__}.{f.name}: a None default needs an `X | None` annotation")
            default = ml_collections.FieldReference(None, field_type=typing.get_origin(types_[0]) or types_[0])
        out[f.name] = default
    return out


def defaults(model_config: type | None = None) -> ml_collections.ConfigDict:
    """Every field with its default, config.model's from `model_config` (a backbone's model config dataclass,
    pnapo_jax.backbones.interface; default FLUX's)."""
    model_config = model_config or backbones.BACKBONES[backbones.DEFAULT].config_class
    c = ml_collections.ConfigDict()
    c.seed = 0  # params init (random-init models), t draws, independent noises, data shuffle

    # The transformer: the model config's fields, diffusers config.json names and how to compute them (e.g.
    # pnapo_jax.models.flux.FluxConfig). Sequence fields are tuples: ml_collections overrides those from the
    # command line (not lists).
    c.model = model_fields(model_config)  # the fields of the model config dataclass, with its defaults
    c.model.backbone = model_config.backbone  # the model family (pnapo_jax.backbones.BACKBONES): flux, ...
    c.model.pretrained = ""  # diffusers folder, pipeline folder, hub id, gs:// path, or BFL .safetensors; "" = init
    c.model.pretrained_format = "diffusers"  # diffusers | the backbone's others (FLUX: bfl, its original single file)
    c.model.reference_dtype = "float32"  # storage dtype of the frozen reference ("bfloat16" on TPU)

    # LoRA: only adapters train; the reference is the base weights with adapters off (no second copy).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tune
    c.lora.alpha = 0.0  # scale alpha / rank; 0 means alpha = rank (diffusers' default)
    c.lora.targets = getattr(model_config, "lora_targets", ())  # Dense layers with adapters; --config.lora.targets=a,b

    # The PNAPO loss (pnapo_jax.objective.LossConfig): beta, convention, noise mode, dynamic beta.
    c.pnapo = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))
    # diffusers' FLUX DreamBooth README trains with --guidance_scale=1 (the scripts' argparse default is 3.5).
    # A backbone without a guidance input (not guidance-distilled) ignores it.
    c.pnapo.guidance = 1.0  # guidance input of guidance-distilled models in training (the model's conditioning)
    c.pnapo.ref_cache = False  # reference errors from a cache made once per (record, grid t), no reference forward
    # a step (needs noise_mode "recorded" and t_sampling.kind "grid"; pnapo_jax/ref_cache.py)
    c.pnapo.ref_cache_dir = ""  # where the cache lives ("" = WORKDIR/ref_cache); a rerun reuses it

    # Training t ~ kind; logit_normal is sigmoid(N(logit_mean, logit_std)); mode uses mode_scale.
    c.t_sampling = ml_collections.ConfigDict()
    c.t_sampling.kind = "uniform"  # uniform | logit_normal | mode | grid (grid_size fixed t: (j + 1/2) / grid_size)
    c.t_sampling.logit_mean = 0.0  # logit-normal location (0: centred on t = 0.5)
    c.t_sampling.logit_std = 1.0  # logit-normal scale
    c.t_sampling.mode_scale = 1.29  # SD3's mode sampler scale
    c.t_sampling.grid_size = 8  # t points of the grid sampler
    c.t_sampling.resolution_shift = False  # apply FLUX's resolution-dependent shift (mu from image tokens)

    # AdamW with global-norm clipping and linear warmup; updates with non-finite gradients are skipped.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6  # the paper's learning rate for FLUX and SD3-M
    c.optim.schedule = "constant"  # constant | cosine (to 0 at train.num_steps), both after warmup
    c.optim.warmup_steps = 0  # linear warmup from lr 0
    c.optim.b1 = 0.9  # AdamW first-moment decay
    c.optim.b2 = 0.999  # AdamW second-moment decay
    c.optim.eps = 1e-8  # AdamW denominator epsilon
    c.optim.weight_decay = 1e-2  # decoupled weight decay (AdamW)
    c.optim.grad_clip = 1.0  # global-norm clip; 0 disables
    c.optim.mu_dtype = ""  # AdamW first moment's storage dtype: "" = the params', "bfloat16" halves its memory
    # "bfloat16" (needs model.dtype "bfloat16"): the Dense weights are differentiated as the bf16 copy the model
    # computes with, so their gradients stay bf16 until the update, half the memory of fp32 ones
    c.optim.grad_dtype = ""  # the gradients' dtype: "" = the params', or "bfloat16" (above)

    # The run: length, batch, logging and eval cadence.
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000  # optimizer updates
    c.train.global_batch_size = 8  # preference pairs per update, over all hosts
    c.train.grad_accum_steps = 1  # micro-batches per update (global_batch_size must divide by it)
    c.train.log_every = 10  # steps between metric lines
    c.train.eval_every = 0  # steps between evals on data.eval_path (0: never)
    c.train.eval_batches = 4  # batches per eval
    c.train.ema_decay = 0.0  # > 0: keep an EMA of the trained params, which evals, export and sampling use; 0: off
    c.train.regenerate_every = 0  # > 0: iterative PNAPO, new pairs from the policy every K steps; 0: off
    c.train.max_nonfinite_steps = 20  # stop (one line) after this many non-finite updates in a row; 0: never

    # Input pipeline (pnapo_jax.data). Shapes are in packed tokens: image_tokens = (H/16) * (W/16) for FLUX.
    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # synthetic | array_record | generate (pairs made first into WORKDIR/pairs)
    c.data.path = ""  # dataset directory written by pnapo_jax.data / pnapo_jax.generate
    c.data.eval_path = ""  # held-out pairs for eval lines ("" = none)
    c.data.latent_h_tokens = 64  # packed latent grid rows (1024 px / 16)
    c.data.latent_w_tokens = 64  # packed latent grid columns
    c.data.text_len = 512  # T5 tokens (FLUX.1-dev: 512)
    c.data.synthetic_num = 256  # records of the synthetic source
    c.data.worker_count = 0  # grain worker processes per host
    c.data.on_bad_record = "raise"  # raise | skip (skipped records are counted in the metrics)

    # Off-policy pair generation (python -m pnapo_jax.generate): K samples per prompt, ranked by the reward.
    c.generate = ml_collections.ConfigDict()
    c.generate.world = "demo"  # text encoder, decoder, reward: demo (the embedded world) | flux (a FLUX/SD3 folder)
    c.generate.pipeline = ""  # flux: pipeline folder (text_encoder*, tokenizer*, vae); "" = model.pretrained's
    c.generate.reward = "hpsv2"  # flux: hpsv2 | pickscore | clip_score | aesthetic | imagereward (pnapo_jax.rewards)
    c.generate.reward_path = ""  # flux: local folder of the reward's weights and tokenizer (required)
    c.generate.prompts_file = ""  # flux: the prompts of world.prompts(split), "{split}" in it replaced; "" = none
    c.generate.images_per_prompt = 4  # K samples per prompt, each from its own recorded noise
    c.generate.num_steps = 28  # Euler steps (FluxPipeline's default; the paper used 50)
    c.generate.guidance_scale = 3.5  # guidance input of guidance-distilled models (FLUX.1-dev)
    c.generate.shift_mu = ml_collections.FieldReference(None, field_type=float)  # None: FLUX's resolution rule
    c.generate.pairs = "best_worst"  # best_worst | all_above_gap
    c.generate.min_gap = 0.0  # pairs with a smaller reward gap are not kept (ties never are)
    c.generate.prompts_per_batch = 8  # prompts sampled together (x K images)
    c.generate.prompts_per_chunk = 256  # prompts per resumable output chunk
    c.generate.split = "train"  # data.source=generate: the world's prompt split to make pairs for
    c.generate.max_prompts = 0  # data.source=generate: use the split's first N prompts (0: all)
    c.generate.seed = 0  # noise of image k of prompt p: normal(fold_in(PRNGKey(seed), p * K + k))
    c.generate.eta = 0.0  # 0: the Euler ODE; (0, 1]: stochastic DDIM-eta steps, noises from each image's seed
    c.generate.shared_noise = False  # a prompt's K images start from one noise (seed p * K; needs eta > 0)

    # Evaluation by sampling (a world's prompts and reward; fidelity where it has one): policy vs base, fixed noises.
    c.eval = ml_collections.ConfigDict()
    c.eval.sample_every = 0  # steps between sampling evals (0: never); also before training and at the end
    c.eval.split = "heldout"  # the world's prompt split to evaluate on
    c.eval.num_prompts = 32  # prompts evaluated
    c.eval.samples_per_prompt = 2  # noises per prompt (the same for policy and base)
    c.eval.num_steps = 20  # Euler steps of eval samples
    c.eval.batch_size = 16  # images sampled together
    c.eval.seed = 1234  # eval noises: normal(fold_in(PRNGKey(seed), i))

    # Orbax checkpoints under WORKDIR/checkpoints; a rerun with the same workdir resumes from the latest.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # also on SIGTERM (TPU preemption) and at the end
    c.checkpoint.keep = 3  # most recent checkpoints kept
    c.checkpoint.async_save = True  # write in the background while training continues

    # Device mesh (data, fsdp, tensor); -1 = the devices the other axes leave.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data parallelism (weights replicated across it)
    c.mesh.fsdp = -1  # data parallelism with weights and optimizer state sharded across it
    c.mesh.tensor = 1  # tensor parallelism over heads / MLP width
    c.logical_axis_rules = [list(r) if isinstance(r[1], tuple) else r for r in DEFAULT_RULES]  # see DEFAULT_RULES
    return c
