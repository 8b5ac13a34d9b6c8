"""Adding a backbone touches no generic module: a toy model family, defined here and registered in
pnapo_jax.backbones.BACKBONES, gets its run config from `config.defaults(ToyConfig)`, its fields checked through its
Backbone's hooks (config_problems, resume_fixed, lora_layer_names), and trains through the same setup, step and loop.
"""

import dataclasses
import json
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath

from pnapo_jax import backbones, config_check, train
from pnapo_jax import config as config_lib
from pnapo_jax.backbones.interface import DTYPES, Backbone, field_problems
from pnapo_jax.data.schema import SextupleSpec
from pnapo_jax.errors import UserError
from pnapo_jax.models.flux import FluxConfig
from pnapo_jax.models.layers import Dense


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    backbone: ClassVar[str] = "toy"
    channels: int = 8
    text_dim: int = 4
    pooled_dim: int = 4
    hidden: int = 16
    activation: str = "tanh"  # tanh | gelu
    scale: float | None = None  # None: 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ("proj_in",)


class ToyModel(nn.Module):
    """v = proj_out(act(proj_in(x) + t * cond(mean text, pooled))) * scale."""

    cfg: ToyConfig

    @nn.compact
    def __call__(self, x_BxIxC, t_B, text_BxTxD, pooled_BxP):
        c = self.cfg
        dense = lambda n, axes, k: Dense(k, axes, c.dtype, c.param_dtype, lora_rank=c.lora_rank * (
            n in c.lora_targets), lora_scale=(c.lora_alpha or c.lora_rank) / max(c.lora_rank, 1), name=n)
        cond_BxH = dense("cond", ("cond_in", "mlp"), c.hidden)(jnp.concatenate([text_BxTxD.mean(1), pooled_BxP], -1))
        h = dense("proj_in", ("embed", "mlp"), c.hidden)(x_BxIxC) + t_B[:, None, None] * cond_BxH[:, None]
        act = jnp.tanh if c.activation == "tanh" else nn.gelu
        return dense("proj_out", ("mlp", "embed"), c.channels)(act(h)) * (1.0 if c.scale is None else c.scale)


@dataclasses.dataclass(frozen=True)
class ToyVelocity:
    cfg: ToyConfig
    h_tokens: int
    w_tokens: int

    def __call__(self, variables, x_BxIxC, t_B, cond):
        return ToyModel(self.cfg).apply(variables, x_BxIxC, t_B, cond["text"], cond["pooled"])


def _model_config(config) -> ToyConfig:
    names = {f.name for f in dataclasses.fields(ToyConfig)} - {"lora_targets"}
    return ToyConfig(**{k: v for k, v in config.model.items() if k in names}, lora_rank=config.lora.rank,
                     lora_alpha=config.lora.alpha, lora_targets=tuple(config.lora.targets))


def _dummy_inputs(cfg: ToyConfig, h: int, w: int, text_len: int, batch: int = 1):
    return (jnp.zeros((batch, h * w, cfg.channels)), jnp.zeros((batch,)),
            _conditioning(jnp.zeros((batch, text_len, cfg.text_dim)), jnp.zeros((batch, cfg.pooled_dim)), None))


def _conditioning(embeds_BxTxD, pooled_BxP, guidance):
    return {"text": embeds_BxTxD, "pooled": pooled_BxP}  # no guidance input: config.pnapo.guidance is ignored


def _init(cfg: ToyConfig, rng) -> dict[str, Any]:
    x, t, cond = _dummy_inputs(cfg, 2, 2, 3)
    return ToyModel(cfg).init(rng, x, t, cond["text"], cond["pooled"])


def _record_spec(config) -> SextupleSpec:
    d, m = config.data, config.model
    return SextupleSpec(d.latent_h_tokens * d.latent_w_tokens, m.channels, d.text_len, m.text_dim, m.pooled_dim)


def _no_files(*args):
    raise NotImplementedError("the toy backbone has no weight files")


TOY = Backbone(
    name="toy", config_class=ToyConfig, model_config=_model_config, init=_init, velocity=ToyVelocity,
    conditioning=_conditioning, record_spec=_record_spec, dummy_inputs=_dummy_inputs,
    check_platform=lambda cfg, platform: None, load_pretrained=_no_files, save_formats=(), save=_no_files,
    merge_lora=_no_files, save_lora=_no_files,
    config_problems=lambda c: field_problems(c, {"model.activation": ("tanh", "gelu"), "model.dtype": DTYPES,
                                                 "model.param_dtype": DTYPES}, {"model.hidden": (1, True)}),
    resume_fixed=("model.channels", "model.hidden"),
    lora_layer_names=lambda c: frozenset({"cond", "proj_in", "proj_out"}))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "toy", TOY)


def toy_config():
    c = config_lib.defaults(ToyConfig)
    c.data.latent_h_tokens, c.data.latent_w_tokens, c.data.text_len, c.data.synthetic_num = 2, 2, 3, 16
    c.train.num_steps, c.train.global_batch_size, c.train.log_every, c.train.eval_every = 4, 4, 2, 0
    c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
    c.pnapo.beta, c.optim.lr = 50.0, 1e-2
    return c


def test_defaults_build_config_model_from_the_model_config():
    c = config_lib.defaults(ToyConfig)
    assert set(c.model) == {"channels", "text_dim", "pooled_dim", "hidden", "activation", "scale", "dtype",
                            "param_dtype", "backbone", "pretrained", "pretrained_format", "reference_dtype"}
    assert c.model.backbone == "toy" and tuple(c.lora.targets) == ("proj_in",)
    c.update_from_flattened_dict({"model.scale": 2.0})  # a None default takes its annotated type (float)
    assert c.model.scale == 2.0
    with pytest.raises(TypeError):
        c.update_from_flattened_dict({"model.scale": "big"})
    flux = config_lib.defaults()
    assert flux.model.backbone == "flux" and flux.to_dict() == config_lib.defaults(FluxConfig).to_dict()


def test_an_unregistered_backbone_is_named():
    with pytest.raises(UserError, match=r"config.model.backbone='toy'; known backbones: flux"):
        config_check.check(toy_config())


@pytest.mark.parametrize("overrides, message", [
    ({"model.activation": "relu"}, "config.model.activation is 'relu'; allowed: 'tanh', 'gelu'"),
    ({"model.hidden": 0}, "config.model.hidden is 0; it must be >= 1"),
    ({"model.dtype": "int8"}, "config.model.dtype is 'int8'"),
    ({"lora.rank": 2, "lora.targets": ("to_q",)},
     "config.lora.targets: no layer is named to_q; Dense layers that take adapters: cond, proj_in, proj_out"),
    ({"train.num_steps": 0}, "config.train.num_steps is 0"),  # the generic checks still run
])
def test_the_backbone_checks_its_own_fields(toy, overrides, message):
    c = toy_config()
    config_check.check(c)  # FLUX's checks (axes_dims_rope, remat policy, its layer names) do not apply
    c.update_from_flattened_dict(overrides)
    with pytest.raises(UserError) as e:
        config_check.check(c)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_complete_config_is_the_backbones(toy):
    c = toy_config()
    del c.model["hidden"]
    with pytest.raises(UserError, match=r"lacks the fields config.model.hidden: it is not a pnapo_jax run's config "
                       r"with config.model.backbone='toy'"):
        config_check.check_complete(c, "config.json")
    flux = config_lib.defaults()
    flux.model.backbone = "toy"  # --config.model.backbone=toy on a FLUX config file: the toy's fields are named
    with pytest.raises(UserError, match=r"the config lacks the fields config.model.activation, config.model.channels"):
        config_check.check(flux)
    saved = json.loads(config_lib.defaults().to_json_best_effort())
    del saved["model"]["backbone"]  # written before backbones had names: FLUX's
    config_check.check_complete(ml_collections.ConfigDict(saved), "config.json")


def test_the_toy_backbone_trains_and_resumes_under_its_own_fixed_fields(toy, tmp_path):
    c = toy_config()
    c.lora.rank = 2
    last = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    assert np.isfinite(last["loss"])
    changed = toy_config()
    changed.lora.rank, changed.train.num_steps, changed.model.activation = 2, 6, "gelu"
    said = []
    config_check.check_resume(changed, tmp_path, log=said.append)  # a free field: allowed, and said
    assert "config.model.activation 'tanh' -> 'gelu'" in said[0]
    changed.model.hidden = 32
    with pytest.raises(UserError, match=r"config.model.hidden was 16, now 32"):
        config_check.check_resume(changed, epath.Path(tmp_path))
