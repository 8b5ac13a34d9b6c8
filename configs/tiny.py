"""A tiny FLUX-shaped model on synthetic pairs: trains for real on a laptop CPU in seconds (used by the tests).

    python -m pnapo_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
    python -m pnapo_jax.main --config=configs/tiny.py:lora --workdir=/tmp/tiny_lora
"""

import ml_collections

from pnapo_jax.config import defaults


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: "" (full fine-tune) or "lora"."""
    c = defaults()
    c.model.in_channels = 16  # 4 latent channels x 2 x 2
    c.model.num_layers = 1
    c.model.num_single_layers = 1
    c.model.num_attention_heads = 2
    c.model.attention_head_dim = 16
    c.model.axes_dims_rope = [4, 6, 6]  # sums to attention_head_dim
    c.model.joint_attention_dim = 32
    c.model.pooled_projection_dim = 16
    c.model.guidance_embeds = True  # as FLUX.1-dev
    c.model.attention_impl = "head_major"  # faster than "xla" on XLA:CPU (docs/benchmarks.md)
    c.model.dense_input_barrier = True  # less backward transpose work on XLA:CPU (docs/benchmarks.md)
    c.pnapo.beta = 50.0  # velocity errors of a random model are O(1): a FLUX-scale beta would saturate
    c.pnapo.n1, c.pnapo.n2 = 4, 12  # the beta schedule plays out within the short run
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.train.num_steps = 16
    c.train.global_batch_size = 8
    c.train.log_every = 2
    c.train.eval_every = 8
    c.train.eval_batches = 1
    c.data.latent_h_tokens = 4
    c.data.latent_w_tokens = 4
    c.data.text_len = 8
    c.data.synthetic_num = 64
    c.checkpoint.every_steps = 8
    c.checkpoint.keep = 2
    if arg == "lora":
        c.lora.rank = 4
        c.lora.targets = ["to_q", "to_k", "to_v", "to_out_0", "proj_mlp", "proj_out"]
    elif arg:
        raise ValueError(f"configs/tiny.py: unknown variant {arg!r} (use '' or 'lora')")
    return c
