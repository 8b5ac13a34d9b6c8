"""FLUX.1-dev aligned with PNAPO on a Cloud TPU pod (v5p), at the paper's settings where it gives them.

    python -m pnapo_jax.main --config=configs/flux_tpu.py --workdir=gs://BUCKET/runs/pnapo \
        --config.data.path=gs://BUCKET/pairs/pnapo_pairs/1.0.0
    python -m pnapo_jax.main --config=configs/flux_tpu.py:lora ...          # LoRA instead of full fine-tune
    python -m pnapo_jax.main --config=configs/flux_tpu.py:independent ...   # Diffusion-DPO baseline (fresh noise)
    python -m pnapo_jax.main --config=configs/flux_tpu.py:v6e ...           # full fine-tune on a v6e-8 (32 GiB chips)

Variants combine with commas: `configs/flux_tpu.py:lora,independent`.
"""

import ml_collections

from pnapo_jax.config import defaults, parse_variants

VARIANTS = ("lora", "independent", "static_beta", "v6e")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: comma-separated variants from VARIANTS ("" = PNAPO, full fine-tune)."""
    variants = parse_variants(arg, VARIANTS, "configs/flux_tpu.py")
    c = defaults()

    # FLUX.1-dev's architecture (its transformer/config.json); the loader checks the file agrees.
    c.model.in_channels = 64
    c.model.num_layers = 19
    c.model.num_single_layers = 38
    c.model.attention_head_dim = 128
    c.model.num_attention_heads = 24
    c.model.joint_attention_dim = 4096
    c.model.pooled_projection_dim = 768
    c.model.guidance_embeds = True
    c.model.axes_dims_rope = [16, 56, 56]
    # Weights: a hub id (needs the HF cache or a token), a local diffusers folder, or gs://.../FLUX.1-dev.
    c.model.pretrained = "black-forest-labs/FLUX.1-dev"
    c.model.pretrained_format = "diffusers"
    # TPU numerics: fp32 master weights, bf16 matmuls, bf16 frozen reference (half the reference's HBM).
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.reference_dtype = "bfloat16"
    c.model.scan_layers = True  # one compiled block per stack: minutes less compile time at 57 blocks
    # Recompute each block in the backward pass, keeping only its bf16 input (1.5 GiB per image), and keep that
    # input in host memory, not HBM ("offload"). Compared on v5p-8 (docs/tpu_fit.md, compiled): per extra image the
    # temporaries grow by 2.07 GiB with "offload" against 3.42 with "full" (which keeps the inputs in HBM), 75.6 vs
    # 81.2 GiB per chip at 16 pairs, the same FLOPs; the cost is host-link traffic (12 GiB each way per step at 16
    # pairs, ~0.2-0.5 s against a ~9-12 s step, overlapped: an estimate, not measured on a TPU). "full" is one
    # override away; "save_named" saves <= 1.3% of the FLOPs and does not fit.
    c.model.remat_policy = "offload"
    c.model.attention_impl = "splash"  # Pallas splash attention: no [L, L] scores in HBM (pnapo_jax/models/splash.py)

    # The paper: beta 2000 for FLUX, recorded noise, dynamic beta (tau, n1, n2 unpublished: our guesses).
    c.pnapo.beta = 2000.0
    c.pnapo.noise_mode = "recorded"
    c.pnapo.guidance = 1.0  # guidance input during training, as diffusers' FLUX fine-tuning scripts
    c.pnapo.tau = 0.01  # HPSv2.1 raw-score units: winner-loser gaps are typically 0.005-0.03
    c.pnapo.n1 = 200
    c.pnapo.n2 = 1000
    c.t_sampling.kind = "uniform"  # as Diffusion-DPO; logit_normal / resolution_shift are one override away

    c.optim.lr = 1e-6  # the paper's
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0

    c.train.num_steps = 2000
    c.train.global_batch_size = 16  # pairs per update; run `python -m pnapo_jax.aot` for what a pod fits
    c.train.grad_accum_steps = 1  # with splash attention 16 pairs fit a v5p-8 at once (76 of 95 GiB, docs/tpu_fit.md)
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 8

    c.data.source = "array_record"
    c.data.path = ""  # required: a dataset written by pnapo_jax.generate / pnapo_jax.data
    c.data.eval_path = ""
    c.data.latent_h_tokens = 64  # 1024 x 1024 images
    c.data.latent_w_tokens = 64
    c.data.text_len = 512  # FLUX.1-dev's T5 length
    c.data.worker_count = 4

    # Pair generation (python -m pnapo_jax.generate) as the paper built its data: 2 samples per prompt at 50
    # steps, ranked by HPSv2; text encoders and VAE from the pipeline folder model.pretrained names.
    c.generate.world = "flux"
    c.generate.reward = "hpsv2"
    c.generate.reward_path = ""  # required: an HPSv2 folder (pnapo_jax.rewards.convert_open_clip makes one)
    c.generate.images_per_prompt = 2
    c.generate.num_steps = 50
    c.generate.guidance_scale = 3.5

    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3

    c.mesh.data = 1
    c.mesh.fsdp = -1  # fully sharded weights and optimizer state over every chip
    c.mesh.tensor = 1

    if "lora" in variants:
        c.lora.rank = 64
        c.lora.alpha = 64.0
        # diffusers' FLUX LoRA scripts' layer set: attention (both streams) and the MLPs.
        c.lora.targets = ["to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj",
                          "to_add_out", "proj", "net_2", "proj_mlp", "proj_out"]
        c.optim.lr = 1e-5  # not in the paper (full fine-tune only); diffusers' DPO LoRA examples use 1e-5
        c.model.remat_policy = "full"  # HBM is not short (8.29 of 16 GiB on v5e-16, 16 pairs): no host traffic
    if "independent" in variants:
        c.pnapo.noise_mode = "independent"  # Diffusion-DPO / Flow-DPO: fresh noise shared by the pair
    if "v6e" in variants:
        # Full fine-tune on a v6e-8 (8 chips x 32 GiB). Compiled at 16 pairs (docs/tpu_fit.md): 30.01 GiB per chip
        # (arguments 16.68 + temporaries 13.23 + code 0.11) with the default "offload" remat (8 GiB of host memory per
        # chip); without the two bf16 options 34.79, which does not fit.
        c.optim.mu_dtype = "bfloat16"  # AdamW's first moment in bf16: 2.77 GiB less of arguments per chip
        c.optim.grad_dtype = "bfloat16"  # Dense weights' gradients in bf16 until the update: half of 5.52 GiB/chip
        c.train.global_batch_size = 16  # the paper's pairs per update, 2 pairs per chip, in one micro-batch
        c.train.grad_accum_steps = 1  # the options above are what fit it at once: no gradient accumulation
    if "static_beta" in variants:
        c.pnapo.use_gap = False
        c.pnapo.use_schedule = False
    return c
