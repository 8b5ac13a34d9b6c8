"""A run config turned into what every command needs: the mesh and its rules, the backbone and its model config,
the weights' shapes and shardings (computed once), the pretrained weights, the train state and its policy and
reference views. The optimizer is built only when something trains (the first use of `Setup.tx`).

State is a plain dict {step, params, opt_state, rng} (+ `ema` with train.ema_decay > 0): `params` are what trains
(all weights, or only the LoRA adapters); `ema` is their exponential moving average, which evaluation, export and
sampling use instead when it is on (it is in the checkpoint, so a resume continues it exactly). The frozen side is
separate and never donated: {"ref": reference weights} for a full fine-tune, or
{"base": base weights} with LoRA, where the reference is the same base applied without adapters.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from pnapo_jax import backbones, config_check, fused_adamw, sharding
from pnapo_jax.backbones import Backbone
from pnapo_jax.data.schema import SextupleSpec

State = dict[str, Any]


def learning_rate(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine to 0 at num_steps."""
    if optim.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1)),
                                     optax.constant_schedule(optim.lr)], [optim.warmup_steps])
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, max(num_steps, 1))
    raise ValueError(f"config.optim.schedule must be 'constant' or 'cosine', got {optim.schedule!r}")


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; a step whose gradients are not finite is skipped and counted (one pass).
    optim.mu_dtype: the first moment's storage dtype ("" = the params')."""
    return fused_adamw.clip_adamw(learning_rate(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                  weight_decay=optim.weight_decay, grad_clip=optim.grad_clip,
                                  mu_dtype=optim.mu_dtype or None)


def _cast(tree: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _unboxed(x: Any) -> Any:
    return x.value if isinstance(x, nn.LogicallyPartitioned) else x


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the commands derive from the config once; the cached properties are computed on first use."""

    config: ml_collections.ConfigDict
    backbone: Backbone
    model_cfg: Any
    mesh: Mesh
    rules: tuple
    optimizer: optax.GradientTransformation | None = None  # None: config.optim's, built when first used

    @property
    def lora(self) -> bool:
        return self.config.lora.rank > 0

    @property
    def ema(self) -> bool:
        """Whether the state keeps an EMA of the trained params (config.train.ema_decay > 0)."""
        return self.config.train.ema_decay > 0

    @property
    def evaluated_key(self) -> str:
        """The state entry that evaluation, export and sampling use: the EMA when it is on, else the params."""
        return "ema" if self.ema else "params"

    @property
    def image_tokens(self) -> int:
        return self.config.data.latent_h_tokens * self.config.data.latent_w_tokens

    @functools.cached_property
    def record_spec(self) -> SextupleSpec:
        """The shapes every training record holds (the one place they derive from the config)."""
        return self.backbone.record_spec(self.config)

    @functools.cached_property
    def velocity(self) -> Any:
        """The model as v(variables, x_t, t, conditioning) on config.data's token grid."""
        d = self.config.data
        return self.backbone.velocity(self.model_cfg, d.latent_h_tokens, d.latent_w_tokens)

    @functools.cached_property
    def tx(self) -> optax.GradientTransformation:
        """The optimizer; commands that never train never build it."""
        return self.optimizer or make_optimizer(self.config.optim, self.config.train.num_steps)

    @functools.cached_property
    def _boxed(self) -> Any:
        """The model's boxed variables {"params", "lora"?} as shapes (eval_shape; nothing allocated)."""
        return jax.eval_shape(lambda: self.backbone.init(self.model_cfg, jax.random.key(self.config.seed)))

    @functools.cached_property
    def variable_shardings(self) -> Any:
        """NamedShardings of the model's variables {"params", "lora"?}."""
        return sharding.logical_shardings(self._boxed, self.mesh, self.rules)

    @functools.cached_property
    def abstract_variables(self) -> dict[str, Any]:
        """The model's variables {"params", "lora"?} as ShapeDtypeStructs with their shardings."""
        # unboxed by hand: nn.meta.unbox under a mesh constrains
        boxed = lambda x: isinstance(x, nn.LogicallyPartitioned)
        leaf = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        return jax.tree.map(lambda x, sh: leaf(_unboxed(x), sh), self._boxed, self.variable_shardings, is_leaf=boxed)

    @property
    def _trainable(self) -> str:
        return "lora" if self.lora else "params"

    @property
    def frozen_key(self) -> str:
        return "base" if self.lora else "ref"

    @functools.cached_property
    def opt_state_shardings(self) -> Any:
        """The optimizer state sharded like the params it tracks (eval_shape alone would replicate it)."""
        abstract_opt = jax.eval_shape(self.tx.init, self._boxed[self._trainable])
        return sharding.logical_shardings(abstract_opt, self.mesh, self.rules)

    @functools.cached_property
    def state_shardings(self) -> State:
        rep = sharding.replicated(self.mesh)
        params = self.variable_shardings[self._trainable]
        return {"step": rep, "params": params, "opt_state": self.opt_state_shardings, "rng": rep,
                **({"ema": params} if self.ema else {})}

    @functools.cached_property
    def frozen_shardings(self) -> Any:
        return {self.frozen_key: self.variable_shardings["params"]}

    @functools.cached_property
    def abstract_state(self) -> State:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        trainable = nn.meta.unbox(self._boxed[self._trainable])
        shapes = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "params": trainable,
                                         "opt_state": self.tx.init(trainable), "rng": jax.random.PRNGKey(0),
                                         **({"ema": trainable} if self.ema else {})})
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    @property
    def abstract_params(self) -> Any:
        """The trained params of a checkpoint (its `state["params"]`, or `state["ema"]`: the same shapes) as
        ShapeDtypeStructs; no optimizer needed."""
        return self.abstract_variables[self._trainable]

    @functools.cached_property
    def abstract_frozen(self) -> Any:
        """The frozen weights as `init_state` holds them: base shapes in config.model.reference_dtype."""
        dtype = jnp.dtype(self.config.model.reference_dtype)
        cast = lambda s: jax.ShapeDtypeStruct(s.shape, dtype if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype,
                                              sharding=s.sharding)
        return {self.frozen_key: jax.tree.map(cast, self.abstract_variables["params"])}

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """The mesh and the logical axis rules, which tracing the model needs."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def make_setup(config: ml_collections.ConfigDict, devices: list | None = None) -> Setup:
    """Checks the whole config first (pnapo_jax.config_check): every command builds its setup before any work."""
    config_check.check(config)
    backbone = backbones.backbone_of(config)
    model_cfg = backbone.model_config(config)
    devices = list(jax.devices() if devices is None else devices)
    backbone.check_platform(model_cfg, devices[0].platform)  # before any weight is loaded
    return Setup(config, backbone, model_cfg, sharding.make_mesh(config.mesh, devices),
                 sharding.rules_from_config(config.logical_axis_rules))


def base_params(setup: Setup) -> Any:
    """The starting weights (pretrained or seeded init): the reference's weights, rebuilt on every (re)start."""
    shardings = setup.variable_shardings["params"]
    if setup.config.model.pretrained:
        return setup.backbone.load_pretrained(setup.config, setup.model_cfg, shardings)
    init = lambda: nn.meta.unbox(setup.backbone.init(setup.model_cfg, jax.random.key(setup.config.seed)))
    with setup.scope():
        return jax.jit(lambda: init()["params"], out_shardings=shardings)()


def init_state(setup: Setup, base: Any) -> tuple[State, Any]:
    """(train state, frozen) on the mesh. Full fine-tune trains a copy of `base`; LoRA trains fresh adapters."""
    frozen_dtype = setup.config.model.reference_dtype
    with setup.scope():
        frozen = jax.jit(lambda p: _cast(p, frozen_dtype), out_shardings=setup.variable_shardings["params"])(base)
        if setup.lora:
            init = lambda: nn.meta.unbox(setup.backbone.init(setup.model_cfg, jax.random.key(setup.config.seed + 1)))
            params = jax.jit(lambda: init()["lora"], out_shardings=setup.variable_shardings["lora"])()
        else:
            params = base
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_state_shardings)(params)
        # the EMA starts at the starting params, in buffers of its own (the train state is donated)
        copy = lambda p: jax.jit(lambda q: jax.tree.map(jnp.copy, q), out_shardings=setup.state_shardings["ema"])(p)
        ema = {"ema": copy(params)} if setup.ema else {}
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
             "rng": jax.random.PRNGKey(setup.config.seed), **ema}
    state = jax.device_put(state, setup.state_shardings)
    return state, {setup.frozen_key: frozen}


def ema_update(decay: float, ema: Any, params: Any) -> Any:
    """One step of the exponential moving average: decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema, params)


def evaluated_params(setup: Setup, state: State) -> Any:
    """What evaluation uses of the state: the EMA of the trained params when train.ema_decay > 0, else them."""
    return state[setup.evaluated_key]


def policy_variables(setup: Setup, trained: Any, frozen: Any) -> dict[str, Any]:
    """The policy as model variables: `trained` params, or frozen base + `trained` adapters."""
    return {"params": frozen["base"], "lora": trained} if setup.lora else {"params": trained}


def reference_variables(setup: Setup, frozen: Any) -> dict[str, Any]:
    """The frozen reference (= the starting model) as model variables."""
    return {"params": frozen[setup.frozen_key]}
