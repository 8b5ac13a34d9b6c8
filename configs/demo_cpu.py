"""The embedded world end to end on a laptop CPU: the shipped base model generates noise-tracked pairs for the
world's train prompts, PNAPO trains on them, and held-out prompts are sampled before, during and after.

    python -m pnapo_jax.main --config=configs/demo_cpu.py --workdir=/tmp/demo
    python -m pnapo_jax.main --config=configs/demo_cpu.py:independent --workdir=/tmp/demo_dpo   # Flow-DPO
    python -m pnapo_jax.main --config=configs/demo_cpu.py:sd3 --workdir=/tmp/demo_sd3   # an SD3 base

Writes WORKDIR/pairs (the generated dataset), metrics.jsonl with eval/reward_mean and eval/win_rate_vs_base,
samples.png (base vs policy from the same noises) and curves.png. Variants combine with commas; `fast`
shrinks everything for tests and notebooks; `sd3` swaps the FLUX base for the shipped SD3-architecture one
(pnapo_jax/assets/demo_base_sd3, made by `python -m pnapo_jax.world.pretrain --backbone=sd3`), all else equal:
the PNAPO settings below were chosen on the FLUX base and are not retuned for it.

Choosing the schedule without the held-out prompts (issue 13): the held-out eval prompts must not pick the
settings they report. Tune on the train prompts instead: pairs for `train_fit` (105 prompts), sampling evals on
`train_val` (30 prompts of two train bindings those pairs leave out; pnapo_jax/world/grammar.py), e.g.

    python -m pnapo_jax.main --config=configs/demo_cpu.py --workdir=/tmp/tune_constant \
        --config.generate.split=train_fit --config.eval.split=train_val --config.eval.num_prompts=30 \
        --config.eval.sample_every=25 --config.optim.schedule=constant    # and =cosine, lower lr, fewer steps

and keep the candidate whose train_val reward is highest at the last step with no earlier eval above it.
What was run (issue 13, 2026-11-29, a 2-core AMD EPYC Zen 3 shared with other jobs, load 4-14): the command above
(476 pairs from the 105 train_fit prompts), then the same with `--config.optim.schedule=cosine`, reading those pairs
(`--config.data.source=array_record --config.data.path=<first WORKDIR>/pairs`). 100 steps each; train_val reward
(30 prompts x 2 samples) at steps 0 / 25 / 50 / 75 / 100, and the win rate against the base at the last step:

    constant 2e-5:            0.680  0.696  0.707  0.731  0.725    win rate 0.64 at 100
    cosine 2e-5 -> 0:         0.680  0.695  0.707  0.723  0.722    win rate 0.58 at 100
    constant 2e-5, 75 steps:  0.680  0.696  0.707  0.731            win rate 0.71 at 75

Both 100-step runs end below their step-75 eval, so neither qualifies. With a constant lr nothing before step 75
depends on num_steps (the lr, the beta schedule, the t / noise draws and the data order are functions of the step),
so the constant run's first 75 steps are the 75-step run: it ends at its highest eval, 0.731, and is chosen (not
rerun: the 100-step constant run used optax's clip + AdamW chain, fused_adamw gives the same updates to float
rounding). Before this protocol the demo ran 100 steps and, on the held-out prompts, peaked at step 50 (reward
0.694) and ended at 0.672; the held-out curve of the 75-step demo is in README.md.

The demo now evaluates, exports and samples an exponential moving average of the weights (train.ema_decay =
0.95, a ~20-step window that lags a past-its-peak curve). That value was set before any run, not tuned on train_val
(the shared box, at load 13-49, left no CPU for the tuning run) nor on held-out; it was decided, before the result
was seen, to ship it whatever the run showed. That run (fresh clone at 8fbcbfb, 2026-11-29): held-out reward 0.623
-> 0.670 (step 50) -> 0.685 (step 75), win rate 0.69: it ends at its highest eval.
"""

import ml_collections

from pnapo_jax.config import defaults, parse_variants
from pnapo_jax.world import demo_base, latents, text

VARIANTS = ("independent", "independent_unshared", "static_beta", "ipo", "sft", "shared_noise", "iterative",
            "ref_cache", "fast", "sd3")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """arg: comma-separated variants from VARIANTS ("" = PNAPO at the demo's settings)."""
    variants = parse_variants(arg, VARIANTS, "configs/demo_cpu.py")
    backbone = "sd3" if "sd3" in variants else "flux"
    model = demo_base.demo_model_config(backbone)
    c = defaults(type(model))

    # The world's shipped base model: a ~2.3M-parameter FLUX (same code as FLUX.1-dev) or SD3, pixel-space latents.
    for k, v in model.to_diffusers().items():
        if k in c.model:
            c.model[k] = v
    c.model.pretrained = str(demo_base.BASES[backbone])  # a diffusers transformer folder inside the package
    c.model.remat_policy = "none"  # small enough to keep every activation
    c.model.attention_impl = "head_major"  # faster than "xla" on XLA:CPU (docs/benchmarks.md)
    c.model.dense_input_barrier = True  # less backward transpose work on XLA:CPU (docs/benchmarks.md)

    c.data.source = "generate"  # pairs from the base model first, into WORKDIR/pairs
    c.data.latent_h_tokens = latents.LATENT_H_TOKENS
    c.data.latent_w_tokens = latents.LATENT_W_TOKENS
    c.data.text_len = text.TEXT_LEN

    c.generate.world = "demo"
    c.generate.images_per_prompt = 4
    c.generate.pairs = "all_above_gap"  # every pair of the 4 whose reward gap is at least min_gap
    c.generate.min_gap = 0.05  # the reward's resolution: smaller gaps are mostly noise
    c.generate.num_steps = 16
    c.generate.prompts_per_batch = 16
    c.generate.prompts_per_chunk = 128

    c.pnapo.beta = 500.0  # velocity MSEs here are O(0.1); not yet tuned on a grid (issue 8's experiment)
    c.pnapo.noise_mode = "recorded"
    c.pnapo.tau = 0.05  # the world's reward gaps are O(0.1)
    c.pnapo.n1, c.pnapo.n2 = 30, 90  # beta eases from step 30 (to 0.5x at 90, past the 75 steps)

    c.optim.lr = 2e-5  # 1e-4 memorised the train pairs within 50 steps and lost held-out reward
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0

    c.train.num_steps = 75  # picked on train_val (docstring): 100 went past the peak
    c.train.ema_decay = 0.95  # evals, export and sampling use the EMA of the weights (a ~20-step window; docstring)
    c.train.global_batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 0  # the sampling eval below is what this demo is about

    c.eval.sample_every = 50
    c.eval.split = "heldout"
    c.eval.num_prompts = 32
    c.eval.samples_per_prompt = 2
    c.eval.num_steps = 16
    c.eval.batch_size = 32

    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 2
    c.mesh.fsdp = -1

    if "independent" in variants:
        c.pnapo.noise_mode = "independent"
    if "independent_unshared" in variants:  # a fresh noise per image, not shared by the pair (issue 18)
        c.pnapo.noise_mode = "independent_unshared"
    if "ipo" in variants:  # the bounded objective (issue 18): the loss stops falling at margin 1/2
        c.pnapo.objective = "ipo"
    if "sft" in variants:  # a winner SFT term; an untuned guess at DPO's gradient scale (beta 500 x sigma ~ 250)
        c.pnapo.sft_weight = 100.0
    if "shared_noise" in variants:  # pairs whose winner and loser start from one recorded noise (issue 18)
        c.generate.shared_noise = True
        c.generate.eta = 0.5  # an untuned middle: 0 makes K equal images, 1 all but forgets the start noise
    if "iterative" in variants:  # iterative PNAPO (issue 18): the policy's own pairs every 25 steps, 2 new rounds
        c.train.regenerate_every = 25
    if "ref_cache" in variants:  # t from 8 fixed points, the reference's errors computed once (issue 18, item 5)
        c.t_sampling.kind = "grid"
        c.pnapo.ref_cache = True
    if "static_beta" in variants:
        c.pnapo.use_gap = False
        c.pnapo.use_schedule = False
    if "fast" in variants:  # seconds, not minutes: tests and notebooks
        c.train.num_steps = 20
        c.train.global_batch_size = 8
        c.train.log_every = 5
        c.eval.sample_every = 10
        c.eval.num_prompts = 4
        c.eval.num_steps = 4
        c.eval.batch_size = 8
        c.generate.num_steps = 4
        c.generate.images_per_prompt = 2
        c.generate.max_prompts = 32
        c.pnapo.n1, c.pnapo.n2 = 5, 15
        c.train.ema_decay = 0.0  # 20 steps: an EMA would still be mostly the base
        c.train.regenerate_every = min(c.train.regenerate_every, 10)  # iterative: one new round at step 10
    return c
