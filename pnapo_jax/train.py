"""PNAPO training: the train state, one pure jitted step on the mesh, and the loop around it.

State is a plain dict {step, params, opt_state, rng}: `params` are what trains (all weights, or only the LoRA
adapters). The frozen side is separate and never donated: {"ref": reference weights} for a full fine-tune, or
{"base": base weights} with LoRA, where the reference is the same base applied without adapters.
"""

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh

from pnapo_jax import config_check, flow, fused_adamw, pnapo, reference, sharding
from pnapo_jax import workdir as run_dir
from pnapo_jax.config import name_list
from pnapo_jax.errors import UserError
from pnapo_jax.models.flux import FluxConfig, FluxTransformer, dummy_inputs
from pnapo_jax.models.layers import check_attention_impl

State = dict[str, Any]
Metrics = dict[str, jax.Array]


def flux_config(config: ml_collections.ConfigDict) -> FluxConfig:
    """The model config: config.model's FluxConfig fields plus config.lora."""
    names = {f.name for f in dataclasses.fields(FluxConfig)}
    kw = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.model.items() if k in names}
    return FluxConfig(**kw, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha,
                      lora_targets=name_list(config.lora.targets))


def learning_rate(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine to 0 at num_steps."""
    if optim.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1)),
                                     optax.constant_schedule(optim.lr)], [optim.warmup_steps])
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, max(num_steps, 1))
    raise ValueError(f"config.optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; a step whose gradients are not finite is skipped and counted (one pass)."""
    return fused_adamw.clip_adamw(learning_rate(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                  weight_decay=optim.weight_decay, grad_clip=optim.grad_clip)


def _cast(tree: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the step and the loop derive from the config once."""

    config: ml_collections.ConfigDict
    model_cfg: FluxConfig
    mesh: Mesh
    rules: tuple
    tx: optax.GradientTransformation

    @property
    def lora(self) -> bool:
        return self.model_cfg.lora_rank > 0

    @property
    def image_tokens(self) -> int:
        return self.config.data.latent_h_tokens * self.config.data.latent_w_tokens

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The mesh and the logical axis rules, which tracing the model needs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def make_setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
    """Checks the whole config first (pnapo_jax.config_check): every command builds its setup before any work."""
    config_check.check(config)
    model_cfg = flux_config(config)
    devices = list(jax.devices() if devices is None else devices)
    check_attention_impl(model_cfg.attention_impl, devices[0].platform)  # before any weight is loaded
    return Setup(config, model_cfg, sharding.make_mesh(config.mesh, devices),
                 sharding.rules_from_config(config.logical_axis_rules),
                 make_optimizer(config.optim, config.train.num_steps))


def _variable_shardings(setup: Setup) -> tuple[Any, Any]:
    """(abstract boxed variables {"params", "lora"?}, their NamedShardings), from eval_shape only."""
    model = FluxTransformer(setup.model_cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(setup.config.seed), **dummy_inputs(setup.model_cfg)))
    return abstract, sharding.logical_shardings(abstract, setup.mesh, setup.rules)


def _load_pretrained(setup: Setup, shardings: Any) -> Any:
    """Pretrained base weights placed straight into `shardings`; the file's architecture must match the config."""
    from pnapo_jax import convert  # heavy imports (safetensors, hub) only when loading

    m = setup.config.model
    dtype = setup.model_cfg.param_dtype
    if m.pretrained_format == "bfl":
        return convert.load_bfl_transformer(m.pretrained, setup.model_cfg, dtype=dtype, shardings=shardings)
    if m.pretrained_format != "diffusers":
        raise ValueError(f"config.model.pretrained_format must be 'diffusers' or 'bfl', got {m.pretrained_format!r}")
    loaded_cfg, params = convert.load_diffusers_transformer(m.pretrained, dtype=dtype, shardings=shardings,
                                                            scan_layers=setup.model_cfg.scan_layers)
    mismatch = {k: (v, getattr(setup.model_cfg, k)) for k, v in loaded_cfg.to_diffusers().items()
                if k != "_class_name" and v != FluxConfig.to_diffusers(setup.model_cfg)[k]}
    if mismatch:
        raise ValueError(f"{m.pretrained}: config.json differs from config.model (file, config): {mismatch}")
    return params


def base_params(setup: Setup) -> Any:
    """The starting weights (pretrained or seeded init): the reference's weights, rebuilt on every (re)start."""
    abstract, shardings = _variable_shardings(setup)
    if setup.config.model.pretrained:
        return _load_pretrained(setup, shardings["params"])
    model = FluxTransformer(setup.model_cfg)
    init = lambda: nn.meta.unbox(model.init(jax.random.key(setup.config.seed), **dummy_inputs(setup.model_cfg)))
    with setup.scope():
        return jax.jit(lambda: init()["params"], out_shardings=shardings["params"])()


def init_state(setup: Setup, base: Any) -> tuple[State, Any]:
    """(train state, frozen) on the mesh. Full fine-tune trains a copy of `base`; LoRA trains fresh adapters."""
    abstract, shardings = _variable_shardings(setup)
    frozen_dtype = setup.config.model.reference_dtype
    frozen_sh = shardings["params"]
    with setup.scope():
        frozen = jax.jit(lambda p: _cast(p, frozen_dtype), out_shardings=frozen_sh)(base)
        if setup.lora:
            model = FluxTransformer(setup.model_cfg)
            params = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(setup.config.seed + 1),
                                                              **dummy_inputs(setup.model_cfg)))["lora"],
                             out_shardings=shardings["lora"])()
        else:
            params = base
        opt_state = jax.jit(setup.tx.init, out_shardings=opt_state_shardings(setup))(params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
             "rng": jax.random.PRNGKey(setup.config.seed)}
    state = jax.device_put(state, state_shardings(setup))
    return state, {"base" if setup.lora else "ref": frozen}


def _trainable_abstract(setup: Setup) -> Any:
    abstract, _ = _variable_shardings(setup)
    return abstract["lora" if setup.lora else "params"]


def opt_state_shardings(setup: Setup) -> Any:
    """The optimizer state sharded like the params it tracks (eval_shape alone would replicate it)."""
    abstract_opt = jax.eval_shape(setup.tx.init, _trainable_abstract(setup))
    return sharding.logical_shardings(abstract_opt, setup.mesh, setup.rules)


def state_shardings(setup: Setup) -> State:
    rep = sharding.replicated(setup.mesh)
    return {"step": rep, "params": sharding.logical_shardings(_trainable_abstract(setup), setup.mesh, setup.rules),
            "opt_state": opt_state_shardings(setup), "rng": rep}


def frozen_shardings(setup: Setup) -> Any:
    _, shardings = _variable_shardings(setup)
    return {"base" if setup.lora else "ref": shardings["params"]}


def abstract_state(setup: Setup) -> State:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    shapes = jax.eval_shape(lambda: {
        "step": jnp.zeros((), jnp.int32), "params": nn.meta.unbox(_trainable_abstract(setup)),
        "opt_state": setup.tx.init(nn.meta.unbox(_trainable_abstract(setup))), "rng": jax.random.PRNGKey(0)})
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(setup))


def abstract_variables(setup: Setup) -> dict[str, Any]:
    """The model's variables {"params", "lora"?} as ShapeDtypeStructs with their shardings (nothing allocated)."""
    abstract, shardings = _variable_shardings(setup)
    boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)  # unboxed by hand: nn.meta.unbox under a mesh constrains
    leaf = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return jax.tree.map(lambda x, sh: leaf(x.value if boxed(x) else x, sh), abstract, shardings, is_leaf=boxed)


def abstract_frozen(setup: Setup) -> Any:
    """The frozen weights as `init_state` holds them: base shapes in config.model.reference_dtype."""
    dtype = jnp.dtype(setup.config.model.reference_dtype)
    cast = lambda s: jax.ShapeDtypeStruct(s.shape, dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype,
                                          sharding=s.sharding)
    return {"base" if setup.lora else "ref": jax.tree.map(cast, abstract_variables(setup)["params"])}


def policy_variables(setup: Setup, state: State, frozen: Any) -> dict[str, Any]:
    """The policy as FluxTransformer variables: trained params, or frozen base + trained adapters."""
    return {"params": frozen["base"], "lora": state["params"]} if setup.lora else {"params": state["params"]}


def reference_variables(setup: Setup, frozen: Any) -> dict[str, Any]:
    """The frozen reference (= the starting model) as FluxTransformer variables."""
    return {"params": frozen["base" if setup.lora else "ref"]}


def _apply_fns(setup: Setup, frozen: Any) -> tuple[Callable, Callable, Any]:
    """(policy_apply, ref_apply, ref_params) for pnapo.pair_loss."""
    model = FluxTransformer(setup.model_cfg)
    if setup.lora:
        policy = lambda lora, **kw: model.apply({"params": frozen["base"], "lora": lora}, **kw)
        ref = lambda base, **kw: model.apply({"params": base}, **kw)
        return policy, ref, frozen["base"]
    apply = lambda p, **kw: model.apply({"params": p}, **kw)
    return apply, apply, frozen["ref"]


def _loss_fn(setup: Setup, frozen: Any) -> Callable:
    policy_apply, ref_apply, ref_params = _apply_fns(setup, frozen)
    data = setup.config.data
    return lambda params, batch, t_B, rng, step: pnapo.pair_loss(
        params, batch, t_B, rng, step, policy_apply=policy_apply, ref_apply=ref_apply, ref_params=ref_params,
        img_ids=flow.img_ids(data.latent_h_tokens, data.latent_w_tokens), txt_ids=flow.txt_ids(data.text_len),
        cfg=setup.config.pnapo)


def _sample_t(setup: Setup, rng: jax.Array, batch: int) -> jax.Array:
    t = setup.config.t_sampling
    mu = flow.resolution_mu(setup.image_tokens) if t.resolution_shift else None
    return flow.sample_t(rng, batch, kind=t.kind, logit_mean=t.logit_mean, logit_std=t.logit_std,
                         mode_scale=t.mode_scale, shift_mu=mu)


def _split_micro(x_BxN: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] taking every k-th row, so each micro-batch keeps the batch sharding's layout."""
    return x_BxN.reshape(x_BxN.shape[0] // k, k, *x_BxN.shape[1:]).swapaxes(0, 1)


def train_step(setup: Setup, state: State, frozen: Any, batch: dict[str, jax.Array]) -> tuple[State, Metrics]:
    """One optimizer update on a global batch of pairs (in `grad_accum_steps` micro-batches). Pure."""
    step = state["step"]
    t_rng, noise_rng = jax.random.split(jax.random.fold_in(state["rng"], step))
    B = batch["x0_w"].shape[0]
    t_B = _sample_t(setup, t_rng, B)
    grad_fn = jax.value_and_grad(_loss_fn(setup, frozen), has_aux=True)
    k = setup.config.train.grad_accum_steps
    if k == 1:
        (_, metrics), grads = grad_fn(state["params"], batch, t_B, noise_rng, step)
    else:
        micro = (jax.tree.map(lambda x: _split_micro(x, k), batch), _split_micro(t_B, k),
                 jax.random.split(noise_rng, k))

        def accumulate(acc, xs):
            (_, m), g = grad_fn(state["params"], *xs, step)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        shapes = jax.eval_shape(lambda: grad_fn(state["params"], *jax.tree.map(lambda x: x[0], micro), step))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, micro)
        grads, metrics = jax.tree.map(lambda x: x / k, (grads, metrics))
    updates, opt_state = setup.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "lr": learning_rate(setup.config.optim, setup.config.train.num_steps)(step),
               "skipped_updates": opt_state.total_notfinite, "nonfinite_streak": opt_state.notfinite_count}
    return {"step": step + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}, metrics


def eval_step(setup: Setup, state: State, frozen: Any, batch: dict[str, jax.Array]) -> Metrics:
    """Loss and reward metrics on held-out pairs, with a fixed t / noise draw so evals are comparable."""
    rng = jax.random.fold_in(jax.random.PRNGKey(setup.config.seed), 2**31 - 1)
    t_rng, noise_rng = jax.random.split(rng)
    t_B = _sample_t(setup, t_rng, batch["x0_w"].shape[0])
    _, metrics = _loss_fn(setup, frozen)(state["params"], batch, t_B, noise_rng, state["step"])
    return metrics


def jit_steps(setup: Setup) -> tuple[Callable, Callable]:
    """(train_step, eval_step) jitted with in/out shardings; the train state is donated."""
    config_check.check(setup.config, setup.mesh.devices.size)  # the global batch against this mesh
    state_sh, frozen_sh = state_shardings(setup), frozen_shardings(setup)
    batch_sh = sharding.batch_sharding(setup.mesh)
    rep = sharding.replicated(setup.mesh)
    step = jax.jit(lambda s, f, b: train_step(setup, s, f, b), in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, rep), donate_argnums=0)
    evaluate = jax.jit(lambda s, f, b: eval_step(setup, s, f, b), in_shardings=(state_sh, frozen_sh, batch_sh),
                       out_shardings=rep)
    return step, evaluate


def _with_rules(setup: Setup, fn: Callable) -> Callable:
    """Run `fn` (tracing included) under the mesh and the logical axis rules."""
    def wrapped(*args):
        with setup.scope():
            return fn(*args)
    return wrapped


def make_source(config: ml_collections.ConfigDict, path: str, seed_offset: int = 0) -> Any:
    """The record source config.data names, refused unless its shapes are the model config's."""
    from pnapo_jax.data.schema import SextupleSpec
    from pnapo_jax.data.source import open_source

    d, m = config.data, config.model
    expected = SextupleSpec(d.latent_h_tokens * d.latent_w_tokens, m.in_channels, d.text_len,
                            m.joint_attention_dim, m.pooled_projection_dim)
    if d.source in ("array_record", "generate") and not path:
        raise ValueError(f"config.data.source={d.source!r} needs a dataset path (config.data.path)")
    kind = "array_record" if d.source == "generate" else d.source
    return open_source(kind, path, expected, d.synthetic_num, config.seed + seed_offset)


def make_train_loader(config: ml_collections.ConfigDict, source: Any, first_step: int = 0) -> Any:
    from pnapo_jax.data.pipeline import LoaderConfig, make_loader

    d = config.data
    cfg = LoaderConfig(global_batch_size=config.train.global_batch_size, seed=config.seed,
                       worker_count=d.worker_count, on_bad_record=d.on_bad_record)
    return make_loader(source, cfg, config.pnapo.noise_mode, first_step=first_step)


def _eval_batches(config: ml_collections.ConfigDict, setup: Setup) -> list[dict[str, jax.Array]] | None:
    """A fixed list of held-out global batches (read once), or None without an eval set."""
    if not config.data.eval_path and config.data.source != "synthetic":
        return None
    if config.train.eval_every <= 0:
        return None
    from pnapo_jax.data.pipeline import global_batch

    loader = make_train_loader(config, make_source(config, config.data.eval_path, seed_offset=10_000))
    batch_sh = sharding.batch_sharding(setup.mesh)
    batches = [global_batch(next(loader), batch_sh) for _ in range(config.train.eval_batches)]
    loader.close()
    return batches


def pairs_path(config: ml_collections.ConfigDict, workdir: str | epath.Path, show_progress: bool) -> str:
    """config.data.path; for source "generate", the base model's pairs for the world's train prompts (split
    config.generate.split), made (resumably) into WORKDIR/pairs first."""
    if config.data.source != "generate":
        return config.data.path
    from pnapo_jax import generate

    workdir = epath.Path(workdir)
    prompts = workdir / "prompts_train.txt"
    if jax.process_index() == 0:
        train_prompts = generate.make_world(config).prompts(config.generate.split)
        prompts.write_text("\n".join(train_prompts[: config.generate.max_prompts or None]))
    generate.run(config, str(prompts), str(workdir / "pairs"), show_progress)
    return str(workdir / "pairs")


class Stopped(Exception):
    """The run stopped early on a signal (preemption, Ctrl-C) with its checkpoint saved: rerun it to resume."""

    EXIT_CODE = 75  # EX_TEMPFAIL: what `python -m pnapo_jax.main` exits with then, so launchers can tell it apart

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped at step {step} on {signal_name or 'a preemption notice'}; the checkpoint is saved")
        self.step = step


def _check_finite(line: dict[str, Any], config: ml_collections.ConfigDict, step: int) -> None:
    """Stops a run whose updates have all been non-finite (so skipped) for train.max_nonfinite_steps steps."""
    limit = config.train.max_nonfinite_steps
    if limit > 0 and line.get("nonfinite_streak", 0) >= limit:
        raise UserError(f"training diverged: the last {line['nonfinite_streak']} updates (to step {step}) had "
                        "non-finite gradients and were skipped; lower config.optim.lr or check the data, then "
                        "rerun to resume from the last checkpoint (config.train.max_nonfinite_steps sets the limit)")


def _finished(workdir: epath.Path, step: int) -> dict[str, Any]:
    """The results a finished run logged: its last train line and its last sampling eval."""
    from pnapo_jax.metrics import read_lines

    path = workdir / "metrics.jsonl"
    lines = [d for d in read_lines(path) if d.get("step", 0) <= step] if path.exists() else []
    last = lambda key: next((d for d in reversed(lines) if key in d), {})
    return {**last("loss"), **last("eval/reward_mean")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices: list | None = None,
                       show_progress: bool = True) -> dict[str, Any]:
    """Train (resuming from WORKDIR/checkpoints if there are any); returns the last train and eval metrics.

    One run at a time per workdir (WORKDIR/run.lock). Raises Stopped when SIGTERM / SIGINT stopped it early
    (checkpoint saved), UserError for what the user can fix (one line). A finished run returns its results.
    """
    from pnapo_jax.checkpoint import Checkpointer
    from pnapo_jax.data.pipeline import global_batch
    from pnapo_jax.metrics import MetricWriter

    sharding.maybe_initialize_distributed()
    setup = make_setup(config, devices)
    workdir = run_dir.resolve(workdir)
    say = lambda text: print(text, flush=True) if jax.process_index() == 0 else None
    # every resource joins the stack as it is made, so an error anywhere closes them all and surfaces itself
    # (an unclosed checkpointer hid it behind orbax's "cannot schedule new futures after interpreter shutdown")
    with contextlib.ExitStack() as stack:
        stack.enter_context(run_dir.locked(workdir))
        ckpt = stack.enter_context(Checkpointer(str(workdir / "checkpoints"), config.checkpoint))
        start = ckpt.latest_step()
        config_check.check_resume(config, workdir)  # before config.json is replaced by this run's
        reference.check_or_record(config, str(workdir), resuming=start is not None, write=jax.process_index() == 0)
        if jax.process_index() == 0:  # export and eval scripts rebuild the model from it
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        logging.info("mesh %s; model %s", dict(setup.mesh.shape), setup.model_cfg)
        source = make_source(config, pairs_path(config, workdir, show_progress))
        same_hosts = start is not None and ckpt.has_data_state(start)
        if start is not None and not same_hosts:  # the saved positions are per host: start at the step's batch
            logging.warning("checkpoint %d was written by another number of hosts: data resumes at global batch "
                            "%d (exact unless records were skipped as bad)", start, start)
        loader = make_train_loader(config, source, first_step=0 if same_hosts or start is None else start)
        stack.callback(loader.close)
        base = base_params(setup)
        state, frozen = init_state(setup, base)
        del base
        resuming = start is not None
        if resuming:  # the newest checkpoint that restores: a damaged newest one falls back to an older one
            state = ckpt.restore(start, abstract_state(setup), loader.iterator if same_hosts else None)
        start = int(state["step"])
        if start >= config.train.num_steps:
            say(f"already finished at step {start} ({workdir})")
            return _finished(workdir, start)
        if resuming:
            say(f"resuming from step {start} ({workdir})")
        writer = MetricWriter(str(workdir), config.train.num_steps, start, show_progress)
        stack.callback(writer.close)
        step_fn, eval_fn = (_with_rules(setup, f) for f in jit_steps(setup))
        eval_batches = _eval_batches(config, setup)
        if config.eval.sample_every > 0:
            writer.phase("evaluating the base")
        sample_eval = _sample_eval(config, setup, frozen)
        batch_sh = sharding.batch_sharding(setup.mesh)
        line: dict[str, Any] = {}
        evaluated: dict[str, Any] = {}

        def evaluate_samples(step: int) -> None:
            nonlocal evaluated
            writer.phase("evaluating")
            metrics, images, rewards = sample_eval(policy_variables(setup, state, frozen))
            evaluated = writer.write(step, metrics)
            if jax.process_index() == 0:
                from pnapo_jax import report

                report.write(workdir, sample_eval, images, rewards, step)
            writer.phase("training")

        if sample_eval and start == 0:
            evaluate_samples(0)
        for step in range(start + 1, config.train.num_steps + 1):
            if step == start + 1:
                writer.phase("compiling the train step")
            state, metrics = step_fn(state, frozen, global_batch(next(loader), batch_sh))
            if step == start + 1:
                writer.phase("training")
            if step % config.train.log_every == 0 or step == config.train.num_steps:
                line = writer.write(step, {**metrics, "skipped_records": loader.skipped})
                writer.progress(step, line, config.train.global_batch_size)
                _check_finite(line, config, step)
            if eval_batches and step % config.train.eval_every == 0:
                writer.phase("evaluating")
                writer.write(step, _mean_metrics(eval_fn(state, frozen, b) for b in eval_batches))
                writer.phase("training")
            if sample_eval and (step % config.eval.sample_every == 0 or step == config.train.num_steps):
                evaluate_samples(step)
            stop = ckpt.should_stop(step)
            ckpt.save(step, state, loader.iterator, force=stop or step == config.train.num_steps)
            if stop:
                ckpt.wait()
                raise Stopped(step, ckpt.stop_signal)
        ckpt.wait()
    return {**line, **evaluated}


def _sample_eval(config: ml_collections.ConfigDict, setup: Setup, frozen: Any) -> Any:
    """Sampling eval against the frozen base on the world's held-out prompts, when config.eval asks for it."""
    if config.eval.sample_every <= 0:
        return None
    from pnapo_jax import evaluate, generate

    return evaluate.SampleEval(setup, generate.make_world(config), config.eval,
                               reference_variables(setup, frozen))


def _mean_metrics(metrics: Iterator[Metrics]) -> dict[str, float]:
    ms = [jax.device_get(m) for m in metrics]
    return {f"eval/{k}": float(np.mean([m[k] for m in ms])) for k in ms[0]}

