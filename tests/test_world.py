"""The embedded world: grammar and split, renderer, latents, text encoder, reward, fidelity, shipped base."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import linen as nn

from pnapo_jax.backbones import BACKBONES
from pnapo_jax.world import components, fidelity, grammar, latents, pretrain, render, reward, text
from pnapo_jax.world import demo_base as base

TRAIN, HELDOUT = grammar.prompts("train"), grammar.prompts("heldout")


def _noise_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(n, render.SIZE, render.SIZE, 3)).astype(np.float32)


def test_grammar_split_is_deterministic_disjoint_and_compositional():
    assert (TRAIN, HELDOUT) == (grammar.prompts("train"), grammar.prompts("heldout"))
    assert len(TRAIN) == 135 and len(HELDOUT) == 45 and not set(TRAIN) & set(HELDOUT)
    assert sorted(TRAIN + HELDOUT) == sorted(grammar.prompts("all"))
    assert set(" ".join(HELDOUT).split()) <= set(" ".join(TRAIN).split())  # only the bindings are unseen
    pairs = {(grammar.parse(p).colour, grammar.parse(p).shape) for p in HELDOUT}
    assert pairs == set(grammar.HELD_OUT_PAIRS)
    assert grammar.parse("two red circles on the left") == grammar.Prompt(2, "red", "circle", "left")
    with pytest.raises(ValueError):
        grammar.parse("a purple circle on the left")


def test_train_prompts_split_into_fit_and_validation_by_binding():
    """Tuning never sees the held-out prompts: train_fit and train_val partition the train prompts, in grammar
    order, and the validation prompts are whole train bindings (unseen by a run trained on train_fit)."""
    fit, val = grammar.prompts("train_fit"), grammar.prompts("train_val")
    assert (len(fit), len(val)) == (105, 30) and not set(fit) & set(val)
    assert [p for p in TRAIN if p in set(fit) | set(val)] == TRAIN and sorted(fit + val) == sorted(TRAIN)
    bindings = {(grammar.parse(p).colour, grammar.parse(p).shape) for p in val}
    assert bindings == set(grammar.VAL_PAIRS) and not bindings & set(grammar.HELD_OUT_PAIRS)
    assert not bindings & {(grammar.parse(p).colour, grammar.parse(p).shape) for p in fit}


def test_generate_split_names_the_prompts_pairs_are_made_for(tmp_path, monkeypatch):
    """data.source=generate makes pairs for config.generate.split's prompts (train by default)."""
    from pnapo_jax import generate, train
    from pnapo_jax.config import defaults

    monkeypatch.setattr(generate, "run", lambda *args, **kw: None)
    config = defaults()
    config.data.source, config.generate.world = "generate", "demo"
    for split in ("train", "train_fit"):
        config.generate.split = split
        train.pairs_path(config, tmp_path, show_progress=False)
        assert (tmp_path / "prompts_train.txt").read_text().splitlines() == grammar.prompts(split)


def test_render_is_deterministic_and_seeds_vary_layout():
    texts, seeds = TRAIN[:6], list(range(6))
    a, b = render.render(texts, seeds), render.render(texts, seeds)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(render.render(texts[:1], [0]), render.render(texts[:1], [1]))


def test_latents_are_packed_pixels_and_decode_inverts_encode():
    images = render.render(TRAIN[:3], [0, 1, 2])
    z = latents.encode(images)
    assert z.shape == (3, 256, 12) and np.isclose(z.min(), 2 * render.BACKGROUND.min() - 1)
    np.testing.assert_allclose(latents.decode(z), images, atol=1e-6)


def test_encode_prompts_shapes_determinism_and_distinctness():
    embeds, pooled = text.encode_prompts(grammar.prompts("all"))
    assert embeds.shape == (180, text.TEXT_LEN, text.TEXT_DIM) and pooled.shape == (180, text.POOLED_DIM)
    again = text.encode_prompts(grammar.prompts("all")[:2])
    np.testing.assert_array_equal(again[0], embeds[:2])
    np.testing.assert_array_equal(again[1], pooled[:2])
    dist = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)
    assert dist[~np.eye(180, dtype=bool)].min() > 0.1  # the pooled vector alone tells prompts apart
    with pytest.raises(ValueError):
        text.encode_prompts(["a red hexagon on the left"])


@pytest.mark.parametrize("prompt, other", [
    ("two red circles on the left", "two blue circles on the left"),  # colour
    ("two red circles on the left", "two red squares on the left"),  # shape
    ("a yellow triangle at the top", "a yellow square at the top"),  # shape
    ("two red circles on the left", "two red circles on the right"),  # position
    ("a green square in the center", "a green square at the bottom"),  # position
    ("three blue triangles at the bottom", "a blue triangle at the bottom"),  # count
])
def test_reward_prefers_the_prompts_own_rendering(prompt, other):
    for seed in range(4):
        lay = render.layout(prompt, seed)  # one layout for both, so that only the prompt's meaning differs
        images = np.stack([render.draw(grammar.parse(t), lay) for t in (prompt, other)])
        r_own, r_wrong = reward.reward(images, [prompt, prompt])
        assert r_own > r_wrong + 0.1, (seed, r_own, r_wrong)


def test_reward_scores_clean_renderings_high_and_noise_low():
    texts = grammar.prompts("all")
    table = reward.score_table(render.render(texts, range(len(texts))), texts)
    assert table["follow"].min() > 0.9
    assert reward.reward(_noise_images(20), texts[:20]).max() < 0.1
    # The preference: bigger shapes. Renderings draw the size uniformly, so about a quarter satisfy it.
    assert 0.1 < np.mean(table["size"] >= 0.75) < 0.4
    small, big = (render.draw(grammar.parse(texts[0]), render.Layout(0, 0, h)) for h in render.HALF_SIZE_RANGE)
    r_small, r_big = reward.reward(np.stack([small, big]), texts[:1] * 2)
    assert r_big - r_small > 0.8 * reward.PREFERENCE_WEIGHT


def test_fidelity_is_zero_on_the_data_and_large_off_it():
    texts = HELDOUT[::5]
    clean = render.render(texts, np.arange(len(texts)) + 100)  # seeds that need not lie on the bank's grid
    f_clean, f_noise = fidelity.fidelity(clean, texts), fidelity.fidelity(_noise_images(len(texts)), texts)
    assert f_clean.max() < 1e-3 and f_noise.min() > 0.05
    assert fidelity.fidelity(render.render(texts[1:2], [0]), texts[:1])[0] > f_clean.max()  # another prompt's image


SMALL = {"flux": dict(num_layers=1, num_single_layers=1, num_attention_heads=1),  # the base, one block of each
         "sd3": dict(num_layers=1, num_attention_heads=1, caption_projection_dim=32)}


@pytest.mark.parametrize("backbone", ["flux", "sd3"])
def test_pretrain_reproduces_its_weights_and_saves_a_loadable_folder(tmp_path, backbone):
    """Either backbone's base: the same flags give the same weights, and load_base finds the family by the
    folder's config.json class."""
    cfg = dataclasses.replace(base.demo_model_config(backbone), **SMALL[backbone])
    runs = [pretrain.pretrain(cfg, steps=2, batch=2, lr=1e-3, seed=3, log_every=2) for _ in range(2)]
    for a, b in zip(jax.tree.leaves(runs[0][0]), jax.tree.leaves(runs[1][0]), strict=True):
        np.testing.assert_array_equal(a, b)
    init = nn.meta.unbox(BACKBONES[backbone].init(cfg, jax.random.key(3)))["params"]
    assert not np.array_equal(jax.tree.leaves(init)[0], jax.tree.leaves(runs[0][0])[0])
    base.save_base(tmp_path / "base", cfg, *runs[0])
    assert runs[0][1]["backbone"] == backbone and base.folder_backbone(tmp_path / "base") == backbone
    loaded_cfg, loaded = base.load_base(tmp_path / "base")
    assert loaded_cfg == cfg
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x, base.STORE_DTYPE), y), runs[0][0], loaded)


@pytest.mark.parametrize("backbone", ["flux", "sd3"])
def test_shipped_base_loads_and_samples_follow_prompts(backbone):
    world = components(backbone)
    cfg, params = world.load_base()
    assert cfg == base.demo_model_config(backbone)
    token_width = cfg.token_dim if backbone == "sd3" else cfg.in_channels  # SD3 patches 2x2 itself: 3 x 4
    assert (token_width, cfg.joint_attention_dim, cfg.pooled_projection_dim) == (
        world.in_channels, world.text_dim, world.pooled_dim)
    texts = TRAIN[::17] + HELDOUT[::11]  # 8 + 5 prompts
    images = base.sample(cfg, params, texts, seed=0, num_steps=20)
    noise = _noise_images(len(texts))
    r_samples, r_noise = world.reward(images, texts), world.reward(noise, texts)
    f_samples, f_noise = world.fidelity(images, texts), world.fidelity(noise, texts)
    print(f"{backbone} base samples: reward {r_samples.mean():.3f} fidelity {f_samples.mean():.4f}; "
          f"noise: reward {r_noise.mean():.3f} fidelity {f_noise.mean():.4f}")
    # The SD3 base had 200 pretrain steps on a busy box (the FLUX base 1400): it draws the scenes (fidelity) but
    # follows the prompts far less (reward 0.15 here, noise 0.00; README's SD3 paragraph).
    assert r_samples.mean() > r_noise.mean() + {"flux": 0.3, "sd3": 0.1}[backbone]
    assert f_samples.mean() < f_noise.mean() / 10
