"""The world's text encoder: fixed and seeded, not learned, standing in for T5 (sequence) and CLIP (pooled).

Each word of the grammar's vocabulary has a fixed random embedding; a prompt's sequence embedding is its
words' embeddings (padded with the pad word to TEXT_LEN) plus a sinusoidal position code, and its pooled
embedding is the mean of its words' fixed projections, squashed by tanh. Both are row lookups and sums, so a
prompt's encoding does not depend on the batch it is in. Every grammar slot has its own words, so the pooled
vector alone already tells the prompts apart.
"""

from collections.abc import Sequence

import numpy as np

from pnapo_jax.world import grammar

TEXT_LEN = 8
TEXT_DIM = 32
POOLED_DIM = 16
SEED = 20240801
_WORD_ID = {w: i for i, w in enumerate(grammar.VOCAB)}


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(word embeddings [V, D], position code [T, D], projected words [V, P]), the same on every call."""
    rng = np.random.default_rng(SEED)
    words_VxD = rng.standard_normal((len(grammar.VOCAB), TEXT_DIM)).astype(np.float32)
    proj_DxP = (rng.standard_normal((TEXT_DIM, POOLED_DIM)) / np.sqrt(TEXT_DIM)).astype(np.float32)
    freqs = 1.0 / 100.0 ** (np.arange(TEXT_DIM // 2) / (TEXT_DIM // 2))
    angles_TxF = np.arange(TEXT_LEN)[:, None] * freqs[None]
    pos_TxD = np.concatenate([np.sin(angles_TxF), np.cos(angles_TxF)], -1).astype(np.float32)
    return words_VxD, pos_TxD, words_VxD @ proj_DxP


_WORDS_VxD, _POS_TxD, _POOLED_WORDS_VxP = _tables()


def tokenize(prompts: Sequence[str]) -> np.ndarray:
    """[B, TEXT_LEN] word ids, padded with 0 (the pad word); ValueError for words outside the grammar."""
    ids_BxT = np.zeros((len(prompts), TEXT_LEN), np.int32)
    for b, text in enumerate(prompts):
        words = text.split()
        if len(words) > TEXT_LEN or any(w not in _WORD_ID for w in words):
            raise ValueError(f"not a prompt of the world's grammar: {text!r}")
        ids_BxT[b, :len(words)] = [_WORD_ID[w] for w in words]
    return ids_BxT


def encode_prompts(prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt texts -> (prompt_embeds [B, TEXT_LEN, TEXT_DIM], pooled [B, POOLED_DIM]), float32."""
    ids_BxT = tokenize(prompts)
    is_word_BxT = (ids_BxT > 0).astype(np.float32)
    sum_BxP = (_POOLED_WORDS_VxP[ids_BxT] * is_word_BxT[..., None]).sum(1)
    return _WORDS_VxD[ids_BxT] + _POS_TxD, np.tanh(sum_BxP / np.maximum(is_word_BxT.sum(1, keepdims=True), 1))
