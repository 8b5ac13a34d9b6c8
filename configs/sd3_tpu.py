"""Stable Diffusion 3 Medium aligned with PNAPO on a Cloud TPU pod (v5p), at the paper's SD3 settings: beta 5000,
lr 1e-6, recorded noise, dynamic beta.

    python -m pnapo_jax.main --config=configs/sd3_tpu.py --workdir=gs://BUCKET/runs/pnapo_sd3 \
        --config.data.path=gs://BUCKET/pairs/pnapo_sd3_pairs/1.0.0
    python -m pnapo_jax.main --config=configs/sd3_tpu.py:lora ...          # LoRA instead of full fine-tune
    python -m pnapo_jax.main --config=configs/sd3_tpu.py:independent ...   # Diffusion-DPO baseline (fresh noise)
    python -m pnapo_jax.main --config=configs/sd3_tpu.py:static_beta ...   # constant beta (no gap, no schedule)
    python -m pnapo_jax.main --config=configs/sd3_tpu.py:large ...         # SD3.5-Large's architecture and weights
    python -m pnapo_jax.main --config=configs/sd3_tpu.py:medium35 ...      # SD3.5-Medium's (MMDiT-X, QK norm)

Variants combine with commas (`configs/sd3_tpu.py:large,lora`). SD3 trained its own flow model with logit-normal
t-sampling; the paper's runs (as Diffusion-DPO) draw t uniformly, which this config keeps: SD3's sampler is one
override away, `--config.t_sampling.kind=logit_normal` (logit_mean 0, logit_std 1 as SD3's paper).
"""

import ml_collections

from pnapo_jax.config import defaults, parse_variants
from pnapo_jax.models.sd3 import SD3Config

VARIANTS = ("lora", "independent", "static_beta", "large", "medium35")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: comma-separated variants from VARIANTS ("" = PNAPO on SD3-Medium, full fine-tune)."""
    variants = parse_variants(arg, VARIANTS, "configs/sd3_tpu.py")
    if {"large", "medium35"} <= set(variants):
        raise ValueError("configs/sd3_tpu.py: choose one of the variants large, medium35")
    c = defaults(SD3Config)  # config.model.backbone = "sd3"

    # SD3-Medium's architecture (its transformer/config.json); the loader checks the file agrees.
    c.model.sample_size = 128  # the latent side the position table is scaled for
    c.model.patch_size = 2  # 2x2 latent patches per token (records are FLUX-style packed tokens)
    c.model.in_channels = 16  # SD3 VAE latent channels
    c.model.out_channels = 16  # predicted velocity channels
    c.model.num_layers = 24  # joint blocks (depth 24)
    c.model.attention_head_dim = 64  # width of each attention head
    c.model.num_attention_heads = 24  # heads per attention (width 24 x 64 = 1536)
    c.model.caption_projection_dim = 1536  # = heads x head_dim
    c.model.joint_attention_dim = 4096  # CLIP-L + CLIP-G states padded to T5's width, joined with T5's
    c.model.pooled_projection_dim = 2048  # CLIP-L (768) + CLIP-G (1280) pooled outputs
    c.model.pos_embed_max_size = 192  # the position table's side, cropped to the latent's token grid
    c.model.dual_attention_layers = ()  # no MMDiT-X blocks in SD3
    c.model.qk_norm = None  # no QK norm in SD3 (SD3.5 has rms_norm)
    # Weights: a hub id (needs the HF cache or a token), a local diffusers folder, or gs://...
    c.model.pretrained = "stabilityai/stable-diffusion-3-medium-diffusers"  # its diffusers repo
    c.model.pretrained_format = "diffusers"  # or single_file: Stability's sd3_medium.safetensors
    # TPU numerics: fp32 master weights, bf16 matmuls, bf16 frozen reference (half the reference's HBM).
    c.model.dtype = "bfloat16"  # compute dtype of the matmuls
    c.model.param_dtype = "float32"  # fp32 master weights
    c.model.reference_dtype = "bfloat16"  # the frozen reference's copy: half the HBM
    c.model.scan_layers = True  # one compiled block per run of equal blocks: less compile time
    c.model.remat_policy = "full"  # recompute each block's activations in the backward pass (HBM-bound)
    c.model.attention_impl = "splash"  # Pallas splash attention: no [L, L] scores in HBM (pnapo_jax/models/splash.py)

    # The paper: beta 5000 for SD3-Medium, recorded noise, dynamic beta (tau, n1, n2 unpublished: our guesses).
    c.pnapo.beta = 5000.0  # the paper's beta for SD3-Medium
    c.pnapo.noise_mode = "recorded"  # each image's own generation noise (PNAPO)
    # (config.pnapo.guidance is not read: SD3 has no guidance input; its guidance is classifier-free.)
    c.pnapo.tau = 0.01  # HPSv2.1 raw-score units: winner-loser gaps are typically 0.005-0.03
    c.pnapo.n1 = 200  # steps before the beta schedule starts moving
    c.pnapo.n2 = 1000  # steps at which it reaches its end value
    c.t_sampling.kind = "uniform"  # as Diffusion-DPO; SD3's logit_normal is `--config.t_sampling.kind=logit_normal`

    c.optim.lr = 1e-6  # the paper's
    c.optim.warmup_steps = 50  # linear warmup
    c.optim.weight_decay = 1e-2  # AdamW decoupled decay
    c.optim.grad_clip = 1.0  # global-norm clip

    c.train.num_steps = 2000  # updates
    c.train.global_batch_size = 16  # pairs per update; run `python -m pnapo_jax.aot` for what a pod fits
    c.train.grad_accum_steps = 1  # micro-batches per update
    c.train.log_every = 10  # steps between metric lines
    c.train.eval_every = 200  # steps between held-out evaluations
    c.train.eval_batches = 8  # held-out batches per evaluation

    c.data.source = "array_record"  # pairs written by pnapo_jax.generate / pnapo_jax.data
    c.data.path = ""  # required: a dataset of SD3 pairs (records hold the joined CLIP + T5 states)
    c.data.eval_path = ""  # held-out pairs ("" = none)
    c.data.latent_h_tokens = 64  # 1024 x 1024 images: 128 x 128 latents, 2x2 patches
    c.data.latent_w_tokens = 64  # token columns (1024 px / 8 / 2)
    c.data.text_len = 333  # StableDiffusion3Pipeline's joint sequence: 77 CLIP tokens + 256 T5 tokens
    c.data.worker_count = 4  # data loader processes

    # Pair generation as the paper built its data: 2 samples per prompt, ranked by HPSv2, from the SD3 pipeline
    # folder's text encoders and VAE with its CFG sampler (pnapo_jax.pipeline_world).
    c.generate.world = "flux"  # the diffusers pipeline world: an SD3 folder for config.model.backbone=sd3
    c.generate.pipeline = ""  # the pipeline folder; "" = model.pretrained's (a hub id fetches those parts)
    c.generate.reward = "hpsv2"  # the ranking reward
    c.generate.reward_path = ""  # required: an HPSv2 folder (pnapo_jax.rewards.convert_open_clip makes one)
    c.generate.images_per_prompt = 2  # samples per prompt
    c.generate.num_steps = 28  # StableDiffusion3Pipeline's default
    c.generate.guidance_scale = 7.0  # StableDiffusion3Pipeline's default classifier-free guidance scale

    c.checkpoint.every_steps = 200  # steps between checkpoints
    c.checkpoint.keep = 3  # checkpoints kept

    c.mesh.data = 1  # no pure data parallelism: FSDP covers it
    c.mesh.fsdp = -1  # fully sharded weights and optimizer state over every chip
    c.mesh.tensor = 1  # no tensor parallelism at 2B parameters

    if "large" in variants:  # SD3.5-Large: 38 blocks of 38 heads, QK RMSNorm
        c.model.num_layers = 38  # joint blocks
        c.model.num_attention_heads = 38  # width 38 x 64 = 2432
        c.model.caption_projection_dim = 2432  # = heads x head_dim
        c.model.qk_norm = "rms_norm"  # RMSNorm on each head's queries and keys
        c.model.pretrained = "stabilityai/stable-diffusion-3.5-large"  # its diffusers repo
    if "medium35" in variants:  # SD3.5-Medium: MMDiT-X (dual attention) in the first 13 blocks, QK RMSNorm
        c.model.dual_attention_layers = tuple(range(13))  # blocks 0-12 add an image-only attention
        c.model.qk_norm = "rms_norm"  # RMSNorm on each head's queries and keys
        c.model.pos_embed_max_size = 384  # its larger position table
        c.model.pretrained = "stabilityai/stable-diffusion-3.5-medium"  # its diffusers repo
    if "lora" in variants:
        c.lora.rank = 64  # adapter rank
        c.lora.alpha = 64.0  # scale alpha / rank = 1
        # diffusers' SD3 LoRA scripts' layer set: attention of both streams (attn2's to_q/k/v/out match too).
        c.lora.targets = ["to_q", "to_k", "to_v", "to_out_0", "add_q_proj", "add_k_proj", "add_v_proj",  # layers
                          "to_add_out"]
        c.optim.lr = 1e-5  # not in the paper (full fine-tune only); diffusers' DPO LoRA examples use 1e-5
    if "independent" in variants:
        c.pnapo.noise_mode = "independent"  # Diffusion-DPO / Flow-DPO: fresh noise shared by the pair
    if "static_beta" in variants:
        c.pnapo.use_gap = False  # no reward-gap factor
        c.pnapo.use_schedule = False  # no step schedule
    return c
