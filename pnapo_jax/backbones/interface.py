"""What the rest of the package needs from a model family (a backbone): the loss, the samplers, generation, aot
and export call these and nothing model-specific. FLUX (pnapo_jax.backbones.flux) is the first; adding one is a
model module, a converter, a config, tests and one line in pnapo_jax.backbones.BACKBONES.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from pnapo_jax.data.schema import SextupleSpec
from pnapo_jax.flow import VelocityFn

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A model family's functions. `model_cfg` is its own (hashable) config, made from the run config."""

    name: str
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
    save_formats: tuple[str, ...]  # export's --format choices for the merged weights
    save: Callable[[Any, Any, str, str], None]  # (model cfg, params, out, format)
    merge_lora: Callable[[Any, Any, Any], Any]  # (model cfg, base params, adapters) -> merged params
    save_lora: Callable[[Any, Any, str], None]  # (model cfg, adapters, out)


def record_conditioning(backbone: Backbone, batch: Mapping[str, jax.Array], guidance: float | None
                        ) -> dict[str, jax.Array]:
    """The conditioning a batch of records carries (their prompt embeddings), as the backbone's model takes it."""
    return backbone.conditioning(batch["prompt_embeds"], batch["pooled_prompt_embeds"], guidance)
