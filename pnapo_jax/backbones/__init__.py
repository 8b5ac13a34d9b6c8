"""The model families a run can train (config.model.backbone, default flux): name -> Backbone."""

import ml_collections

from pnapo_jax.backbones import flux, sd3
from pnapo_jax.backbones.interface import Backbone, record_conditioning
from pnapo_jax.errors import UserError

BACKBONES = {"flux": flux.BACKBONE, "sd3": sd3.BACKBONE}
DEFAULT = "flux"  # config.defaults()' backbone, and that of configs saved before backbones had names


def backbone_of(config: ml_collections.ConfigDict) -> Backbone:
    """The run's backbone; configs written before backbones had names are FLUX's."""
    name = (config.get("model") or {}).get("backbone", DEFAULT)  # a config lacking fields is refused by name later
    if name not in BACKBONES:
        raise UserError(f"config.model.backbone={name!r}; known backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


__all__ = ["BACKBONES", "DEFAULT", "Backbone", "backbone_of", "record_conditioning"]
