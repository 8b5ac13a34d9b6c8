"""FLUX weights in and out: diffusers folders and BFL single files <-> our Flax params."""

from pnapo_jax.convert.bfl import load_bfl_transformer, save_bfl_transformer
from pnapo_jax.convert.diffusers import load_diffusers_transformer, save_diffusers_transformer
from pnapo_jax.convert.lora import merge_lora, save_lora

__all__ = ["load_bfl_transformer", "load_diffusers_transformer", "merge_lora", "save_bfl_transformer",
           "save_diffusers_transformer", "save_lora"]
