"""The batch contract between any data source and the train step.

One training example is a preference pair with its prior noises (a sextuple). A batch stacks examples on a
leading axis B. Latents and noises are packed the way the transformer consumes them: I image tokens
(= latent_h/2 * latent_w/2, 4096 at 1024x1024) of C channels (64 for FLUX: 16 VAE channels x 2 x 2).

    x0_w, x0_l            float32 [B, I, C]  winner / loser clean latents (what the sampler ended at)
    x1_w, x1_l            float32 [B, I, C]  winner / loser recorded prior noises (t = 1); absent -> only
                                             `independent` noise mode can train
    prompt_embeds         float32 [B, T, joint_attention_dim]  T5 sequence embedding
    pooled_prompt_embeds  float32 [B, pooled_projection_dim]   CLIP pooled embedding
    reward_w, reward_l    float32 [B]  reward of winner / loser (reward_w >= reward_l)
    reward_gap            float32 [B]  reward_w - reward_l, input of dynamic beta

With config.pnapo.ref_cache the train loader adds the reference's cached errors at every grid t (ref_cache.py):

    ref_err_w, ref_err_l  float32 [B, G]  reference velocity MSE of winner / loser at t_sampling's G grid points

pnapo_jax.data.pipeline.make_loader yields these per host (B = global batch / hosts, numpy) with the noise
keys only in `recorded` noise mode, so a run's batch structure does not depend on which dataset it reads;
pnapo_jax.data.pipeline.global_batch turns them into global jax.Arrays. Stored records hold more (prompt
text, generation metadata): see pnapo_jax/data/schema.py.
"""

# x1 = each image's recorded noise (PNAPO) | one fresh draw shared by the pair (Flow-DPO) | two fresh draws, one per
# image (issue 18's missing cell: Flow-DPO's independence without its sharing)
NOISE_MODES = ("recorded", "independent", "independent_unshared")
LATENT_KEYS = ("x0_w", "x0_l")
NOISE_KEYS = ("x1_w", "x1_l")
TEXT_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
REWARD_KEYS = ("reward_w", "reward_l", "reward_gap")
BATCH_KEYS = LATENT_KEYS + NOISE_KEYS + TEXT_KEYS + REWARD_KEYS
REF_CACHE_KEYS = ("ref_err_w", "ref_err_l")
