"""T5 and CLIP text encoders against transformers (torch, CPU, fp32), and FLUX prompt encoding against diffusers.

Tiny random models are saved with save_pretrained and read back through our loaders; tokenizers are built
here from tiny vocabularies (no hub access).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is local files; never reach for the hub

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from flax import traverse_util
from flux_testing import CLIP_TINY, T5_TINY, clip_tokenizer, randomize, t5_tokenizer, torch_clip, torch_t5
from jax.sharding import Mesh, NamedSharding

from pnapo_jax import sharding, text
from pnapo_jax.config import DEFAULT_RULES
from pnapo_jax.convert import hf as hf_files
from pnapo_jax.errors import UserError
from pnapo_jax.models import clip, hf, t5

# name -> (config overrides, sequence length); lengths beyond max_distance reach the logarithmic buckets.
T5_CASES = {"gated_gelu": (dict(), 33), "relu": (dict(feed_forward_proj="relu"), 7),
            "more_buckets": (dict(relative_attention_num_buckets=16, relative_attention_max_distance=40,
                                  num_layers=2), 50)}
CLIP_CASES = {"eos_id": (dict(), 9), "eos_id_not_max": (dict(eos_token_id=5), 20),
              "legacy_eos_2": (dict(eos_token_id=2), 13), "gelu": (dict(hidden_act="gelu", num_hidden_layers=3), 20)}


def _ids_and_mask(batch: int, length: int, vocab: int, eos: int, pad: int, seed: int,
                  reserved: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Random ids with an eos at a different place in each row and padding after it (at least one short row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    for token in (eos, pad, *reserved):
        ids[ids == token] = 6
    ends = np.linspace(length // 3, length - 1, batch).astype(int)
    mask = (np.arange(length)[None] <= ends[:, None]).astype(np.int32)
    ids[np.arange(batch), ends] = eos
    ids = np.where(mask, ids, pad)
    return ids.astype(np.int32), mask


def _rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(T5_CASES))
def test_t5_matches_transformers(tmp_path, name):
    overrides, length = T5_CASES[name]
    model = torch_t5(**overrides)
    model.save_pretrained(tmp_path)
    cfg, params = hf_files.load_t5(tmp_path)
    ids, mask = _ids_and_mask(3, length, cfg.vocab_size, eos=1, pad=0, seed=length)
    encoder = jax.jit(t5.T5Encoder(cfg).apply)
    with torch.no_grad():
        for m in (None, mask):
            ref = model(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m))
            ours = encoder({"params": params}, ids, m)
            assert ours.shape == ref.last_hidden_state.shape
            assert _rel_err(ours, ref.last_hidden_state.numpy()) <= 1e-4


@pytest.mark.parametrize("buckets", [(32, 128), (8, 12), (16, 40)])
def test_relative_position_buckets_match_transformers(buckets):
    num_buckets, max_distance = buckets
    ours = t5.relative_position_buckets(700, 700, num_buckets, max_distance)
    rel = torch.arange(700)[None, :] - torch.arange(700)[:, None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(ours, ref.numpy())


@pytest.mark.parametrize("name", list(CLIP_CASES))
def test_clip_matches_transformers(tmp_path, name):
    overrides, length = CLIP_CASES[name]
    model = torch_clip(**overrides)
    model.save_pretrained(tmp_path)
    cfg, params = hf_files.load_clip_text(tmp_path)
    # Token 2 ahead of the eos and ids above a non-maximal eos tell the two pooling rules apart.
    ids, mask = _ids_and_mask(3, length, cfg.vocab_size, eos=cfg.eos_token_id, pad=cfg.eos_token_id, seed=length,
                              reserved=(2,))
    ids[:, 1] = 2
    encoder = jax.jit(clip.CLIPTextModel(cfg).apply)
    with torch.no_grad():
        for m in (None, mask):
            ref = model(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m))
            hidden, pooled = encoder({"params": params}, ids, m)
            assert _rel_err(hidden, ref.last_hidden_state.numpy()) <= 1e-4
            assert _rel_err(pooled, ref.pooler_output.numpy()) <= 1e-4
    first_eos, argmax = np.argmax(ids == cfg.eos_token_id, -1), np.argmax(ids, -1)
    expected = argmax if cfg.eos_token_id == clip.LEGACY_EOS_TOKEN_ID else first_eos
    np.testing.assert_array_equal(clip.pool_index(ids, cfg.eos_token_id), expected)
    if name in ("eos_id_not_max", "legacy_eos_2"):
        assert not np.array_equal(first_eos, argmax)


def _rewrite(folder, rename=lambda k: k, extra=None) -> None:
    """Rewrite `folder`'s model.safetensors with keys renamed (None: dropped) and extra tensors added."""
    file = folder / hf_files.WEIGHTS_NAME
    tensors = safetensors.torch.load_file(file)
    tensors = {rename(k): v for k, v in tensors.items() if rename(k) is not None}
    safetensors.torch.save_file({**tensors, **(extra or {})}, file, metadata={"format": "pt"})


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_clip_loads_pre_v5_checkpoints(tmp_path):
    """Keys prefixed with `text_model.` and a stored position_ids buffer, as FLUX's text_encoder was written."""
    torch_clip().save_pretrained(tmp_path / "v5")
    torch_clip().save_pretrained(tmp_path / "v4")
    _rewrite(tmp_path / "v4", lambda k: f"text_model.{k}",
             {"text_model.embeddings.position_ids": torch.arange(CLIP_TINY["max_position_embeddings"])[None]})
    _assert_same_params(hf_files.load_clip_text(tmp_path / "v4")[1], hf_files.load_clip_text(tmp_path / "v5")[1])


@pytest.mark.parametrize("stored", ["both", "tied_copy_only"])
def test_t5_loads_tied_embedding_copies(tmp_path, stored):
    torch_t5().save_pretrained(tmp_path / "ref")
    torch_t5().save_pretrained(tmp_path / "alt")
    shared = safetensors.torch.load_file(tmp_path / "ref" / hf_files.WEIGHTS_NAME)["shared.weight"]
    if stored == "both":
        _rewrite(tmp_path / "alt", extra={t5.TIED_KEY: shared.clone()})
    else:
        _rewrite(tmp_path / "alt", lambda k: t5.TIED_KEY if k == "shared.weight" else k)
    _assert_same_params(hf_files.load_t5(tmp_path / "alt")[1], hf_files.load_t5(tmp_path / "ref")[1])


def test_bf16_sharded_checkpoint_loads(tmp_path):
    model = torch_t5().to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / hf_files.INDEX_NAME).exists()
    cfg, params = hf_files.load_t5(tmp_path, param_dtype="float32")
    assert (cfg.dtype, cfg.param_dtype) == ("float32", "float32")
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for path, x in traverse_util.flatten_dict(params).items():
        w = sd[hf_files.hf_key(path)]
        np.testing.assert_array_equal(np.asarray(x), w.T if path[-1] == "kernel" else w)


def test_bf16_compute_stays_close(tmp_path):
    model = torch_t5()
    model.save_pretrained(tmp_path)
    ids, mask = _ids_and_mask(2, 16, T5_TINY["vocab_size"], eos=1, pad=0, seed=0)
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg, params = hf_files.load_t5(tmp_path, dtype=dtype)
        assert jax.tree.leaves(params)[0].dtype == jnp.dtype(dtype)
        out[dtype] = jax.jit(t5.T5Encoder(cfg).apply)({"params": params}, ids, mask)
    assert out["bfloat16"].dtype == jnp.bfloat16
    assert _rel_err(out["bfloat16"], np.asarray(out["float32"])) < 0.05


def test_load_with_shardings(tmp_path):
    torch_t5().save_pretrained(tmp_path)
    cfg, ref = hf_files.load_t5(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), sharding.MESH_AXES)
    abstract = jax.eval_shape(lambda: t5.init_params(cfg, jax.random.key(0)))
    shardings = sharding.logical_shardings(abstract, mesh, DEFAULT_RULES)
    _, params = hf_files.load_t5(tmp_path, shardings=shardings)
    _assert_same_params(params, ref)
    kernel = params["encoder"]["block_0"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))


def test_load_errors_name_the_keys(tmp_path):
    torch_t5().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda k: None if k == "encoder.final_layer_norm.weight" else k,
             {"encoder.block.0.layer.0.SelfAttention.extra.weight": torch.zeros(2)})
    with pytest.raises(UserError, match=r"missing tensors \(1\): encoder\.final_layer_norm\.weight; "
                                        r"unexpected tensors \(1\): encoder\.block\.0\.layer\.0\.SelfAttention\."
                                        r"extra\.weight"):
        hf_files.load_t5(tmp_path)
    torch_clip().save_pretrained(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps({**config, "intermediate_size": 44}))
    with pytest.raises(UserError, match=r"wrong shapes \(\d+\): encoder\.layers\.0\.mlp\.fc1\.bias in .*: "
                                        r"expected \(44,\), found \(40,\), encoder\.layers\.0\.mlp\.fc1\.weight in .*: "
                                        r"expected \(44, 32\), found \(40, 32\)"):
        hf_files.load_clip_text(tmp_path / "clip")


def test_unsupported_activation():
    with pytest.raises(ValueError, match="silu_x"):
        hf.activation("silu_x")


# --- FLUX prompt encoding against diffusers' FluxPipeline.encode_prompt ----------------------------------

@pytest.fixture(scope="module")
def flux_pipeline(tmp_path_factory):
    """A tiny FluxPipeline (text encoders and tokenizers only) and the folder save_pretrained wrote."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    clip_model = torch_clip(vocab_size=len(tokenizer), max_position_embeddings=77, eos_token_id=2,
                             bos_token_id=0, pad_token_id=1)
    t5_model = torch_t5(vocab_size=len(tokenizer_2) + 4)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip_model,
                        tokenizer=tokenizer, text_encoder_2=t5_model, tokenizer_2=tokenizer_2, transformer=None)
    folder = tmp_path_factory.mktemp("flux")
    pipe.save_pretrained(folder)
    return pipe, folder


PROMPTS = ["a photo of a cat", "the tiny red dog under a blue sky " * 12, "zebra"]


@pytest.mark.parametrize("max_sequence_length", [512, 40])
def test_encode_prompts_matches_flux_pipeline(flux_pipeline, max_sequence_length):
    pipe, folder = flux_pipeline
    for sub in (text.CLIP_SUBFOLDER, text.T5_SUBFOLDER, text.CLIP_TOKENIZER_SUBFOLDER, text.T5_TOKENIZER_SUBFOLDER):
        assert (folder / sub).is_dir()
    encoders = text.load_text_encoders(folder)
    embeds, pooled = text.encode_prompts(PROMPTS, encoders, max_sequence_length=max_sequence_length)
    with torch.no_grad():
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None,
                                                        max_sequence_length=max_sequence_length)
    assert embeds.shape == (3, max_sequence_length, T5_TINY["d_model"])
    assert pooled.shape == (3, CLIP_TINY["hidden_size"])
    assert _rel_err(embeds, ref_embeds.numpy()) <= 1e-4
    assert _rel_err(pooled, ref_pooled.numpy()) <= 1e-4


def test_encode_prompts_with_prompt_2(flux_pipeline):
    pipe, folder = flux_pipeline
    encoders = text.load_text_encoders(folder)
    prompts_2 = ["blue sky", "dog on the cat"]
    embeds, pooled = text.encode_prompts(PROMPTS[:2], encoders, prompts_2=prompts_2, max_sequence_length=16)
    with torch.no_grad():
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(PROMPTS[:2], prompt_2=prompts_2, max_sequence_length=16)
    assert _rel_err(embeds, ref_embeds.numpy()) <= 1e-4
    assert _rel_err(pooled, ref_pooled.numpy()) <= 1e-4


@pytest.mark.parametrize("name", ["eos_id", "legacy_eos_2"])
def test_clip_with_projection_matches_transformers(tmp_path, name):
    """CLIPTextModelWithProjection (SD3's CLIP-L / CLIP-G): projected pooled output and every layer's states."""
    overrides, length = CLIP_CASES[name]
    config = transformers.CLIPTextConfig(**{**CLIP_TINY, **overrides, "projection_dim": 24})
    projecting = randomize(transformers.CLIPTextModelWithProjection(config), 0, 0.2)
    projecting.save_pretrained(tmp_path)
    cfg, params = hf_files.load_clip_text_with_projection(tmp_path)
    assert cfg.projection_dim == 24
    ids, mask = _ids_and_mask(3, length, cfg.vocab_size, eos=cfg.eos_token_id, pad=cfg.eos_token_id, seed=length,
                              reserved=(2,))
    with torch.no_grad():
        ref = projecting(torch.from_numpy(ids), output_hidden_states=True)
    hidden, pooled, states = jax.jit(clip.CLIPTextModel(cfg).apply, static_argnames="output_hidden_states")(
        {"params": params}, ids, output_hidden_states=True)
    assert _rel_err(hidden, ref.last_hidden_state.numpy()) <= 1e-4
    assert _rel_err(pooled, ref.text_embeds.numpy()) <= 1e-4
    assert len(states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for ours, theirs in zip(states, ref.hidden_states, strict=True):
        assert _rel_err(ours, theirs.numpy()) <= 1e-4
    with pytest.raises(UserError, match="unexpected tensors.*text_projection"):  # not a plain CLIPTextModel
        hf_files.load_clip_text(tmp_path)
