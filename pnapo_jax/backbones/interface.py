"""What the rest of the package needs from a model family (a backbone): the loss, the samplers, generation, aot,
export and the config check call these and nothing model-specific. FLUX (pnapo_jax.backbones.flux) is the first;
adding one is a model module, a converter, a config, tests and one line in pnapo_jax.backbones.BACKBONES.

The contract for a new backbone NAME (pnapo_jax/config.py, config_check.py, setup.py and the commands stay as they
are):
- Its model config is a frozen dataclass with `backbone: ClassVar[str] = NAME` (FluxConfig is one). Its fields
  whose names do not start with `lora_` become config.model's fields with their defaults (a field defaulting to
  None takes its type from its annotation, e.g. `int | None`); `lora_targets`' default is config.lora.targets'.
  `pnapo_jax.config.defaults(ModelConfig)` builds the default run config from it and adds config.model.backbone =
  NAME, pretrained, pretrained_format ("diffusers") and reference_dtype; a config file calls
  `defaults(ModelConfig)` (`defaults()` is FLUX's). A config without config.model.backbone is FLUX's.
- Its `Backbone` below, registered as BACKBONES[NAME] = Backbone(name=NAME, config_class=ModelConfig, ...). The
  config check asks it for what only the model knows: `config_problems(config)` (one line per bad config.model
  field, naming it: enums such as remat policy, attention impl, dtypes, pretrained_format choices; ranges;
  relations), `resume_fixed` (the config.model fields a resumed run may not change) and `lora_layer_names(config)`
  (the Dense layer names config.lora.targets may name). config_check keeps the generic checks (train, optim, data,
  mesh, pnapo, generate, eval, lora rank). export offers its save_formats and lora.
- Its model's parameters carry the logical axis names of pnapo_jax.config.DEFAULT_RULES (embed, heads, mlp, mod,
  ...); other names stay unsharded. Records are FLUX's packed latent tokens [B, I, C] (record_spec says C, the
  text length and widths).
- config.pnapo.guidance is the guidance input of guidance-distilled models (FLUX.1-dev), handed to
  `conditioning(..., guidance)`; a backbone without such an input ignores it (the loss never reads it).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from pnapo_jax.data.schema import SextupleSpec
from pnapo_jax.flow import VelocityFn

Config = ml_collections.ConfigDict
DTYPES = ("float32", "bfloat16", "float16")  # the dtype names config fields may give


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A model family's functions. `model_cfg` is its own (hashable) config, made from the run config."""

    name: str  # config.model.backbone; the registry key and config_class.backbone
    config_class: type  # the frozen model config dataclass: its non-lora_ fields are config.model's
    model_config: Callable[[Config], Any]  # run config -> model config (config.model, config.lora)
    init: Callable[[Any, jax.Array], Any]  # (model cfg, rng) -> boxed variables {"params", "lora"?} (logical axes)
    # (model cfg, latent grid rows, columns) -> v(variables, x_t [B, I, C], t [B], conditioning), hashable
    velocity: Callable[[Any, int, int], VelocityFn]
    # (prompt embeds [B, T, D], pooled [B, P], guidance or None) -> the model's conditioning, a dict of [B, ...]
    conditioning: Callable[[jax.Array, jax.Array, float | None], dict[str, jax.Array]]
    record_spec: Callable[[Config], SextupleSpec]  # run config -> the shapes every training record holds
    # (model cfg, latent grid rows, columns, text tokens, batch) -> (x_t, t, conditioning) zeros, for tracing
    dummy_inputs: Callable[[Any, int, int, int, int], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    check_platform: Callable[[Any, str], None]  # (model cfg, 'cpu' | 'gpu' | 'tpu'): refuse what cannot run there
    load_pretrained: Callable[[Config, Any, Any], Any]  # (run config, model cfg, shardings) -> params
    save_formats: tuple[str, ...]  # export's --format choices for the merged weights (lora is export's own)
    save: Callable[[Any, Any, str, str], None]  # (model cfg, params, out, format)
    merge_lora: Callable[[Any, Any, Any], Any]  # (model cfg, base params, adapters) -> merged params
    save_lora: Callable[[Any, Any, str], None]  # (model cfg, adapters, out)
    # For the config check, before any work: run config -> one line per bad config.model field, naming it
    config_problems: Callable[[Config], list[str]]
    resume_fixed: tuple[str, ...]  # config.model fields ("model.num_layers", ...) a resumed run may not change
    lora_layer_names: Callable[[Config], frozenset[str]]  # run config -> names config.lora.targets may use
    single_file_formats: tuple[str, ...] = ()  # those of save_formats that write one file (.safetensors appended)


def name_list(value: str | tuple | list) -> tuple[str, ...]:
    """A list-of-names field, however it was given: as configs write it (a list or tuple), or from the command
    line, where `--config.lora.targets=to_q,to_k` arrives as ("to_q,to_k",). Empty names are dropped."""
    items = [value] if isinstance(value, str) else value
    return tuple(name.strip() for item in items for name in str(item).split(",") if name.strip())


def model_config_from(config: Config, config_class: type) -> Any:
    """A backbone's model config: config.model's fields of `config_class` plus config.lora (rank, alpha, targets)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    kw = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in config.model.items() if k in names}
    return config_class(**kw, lora_rank=config.lora.rank, lora_alpha=config.lora.alpha,
                        lora_targets=name_list(config.lora.targets))


class EveryName(tuple):
    """A lora_targets tuple that contains every name: a probe model built with it shows which layers take adapters."""

    def __contains__(self, name: object) -> bool:
        return True


def adapter_layer_names(variables: Any) -> frozenset[str]:
    """The names of the layers holding `lora_a` / `lora_b` in a (shape) variables tree {"params", "lora"?}."""
    paths = jax.tree_util.tree_flatten_with_path(variables.get("lora", {}))[0]
    keys = [[getattr(k, "key", None) for k in path] for path, _ in paths]
    return frozenset(ks[ks.index(leaf) - 1] for ks in keys for leaf in ("lora_a", "lora_b") if leaf in ks)


def field_problems(config: Config, enums: Mapping[str, tuple], minima: Mapping[str, tuple[float, bool]]
                   ) -> list[str]:
    """One line per field ("model.dtype") of `config` outside its allowed values (`enums`) or below its lowest
    (`minima`: field -> (lowest, whether the lowest itself is allowed)): the generic and the backbones' checks."""
    out = [f"config.{k} is {get(config, k)!r}; allowed: {', '.join(map(repr, allowed))}"
           for k, allowed in enums.items() if get(config, k) not in allowed]
    for k, (low, inclusive) in minima.items():
        value = get(config, k)
        if isinstance(value, bool) or not isinstance(value, int | float):
            out.append(f"config.{k} is {value!r}; expected a number")
        elif value < low or (value == low and not inclusive):
            out.append(f"config.{k} is {value}; it must be {'>=' if inclusive else '>'} {low}")
    return out


def get(config: Config, field: str) -> Any:
    """config["a"]["b"] for "a.b"."""
    for key in field.split("."):
        config = config[key]
    return config


def record_conditioning(backbone: Backbone, batch: Mapping[str, jax.Array], guidance: float | None
                        ) -> dict[str, jax.Array]:
    """The conditioning a batch of records carries (their prompt embeddings), as the backbone's model takes it."""
    return backbone.conditioning(batch["prompt_embeds"], batch["pooled_prompt_embeds"], guidance)
