"""config.generate.world -> the world (pnapo_jax.sampling.World) generation and the sampling eval use."""

import ml_collections

from pnapo_jax.sampling import World


def make_world(config: ml_collections.ConfigDict) -> World:
    """The world of config.generate.world: `demo` is the embedded one (pnapo_jax.world), `flux` a pipeline folder
    (FLUX or SD3, by config.model.backbone) and a reward (pnapo_jax.pipeline_world). The whole config, not only its
    generate section: a FLUX world takes its shapes from config.data and its dtype and model id from config.model."""
    name = config.generate.world
    if name == "demo":
        from pnapo_jax import world

        return world.components(config.model.get("backbone", "flux"))  # configs saved before backbones: FLUX
    if name == "flux":
        from pnapo_jax import pipeline_world

        return pipeline_world.PipelineWorld(config)
    raise ValueError(f"config.generate.world={name!r}: known worlds are ('demo', 'flux')")
