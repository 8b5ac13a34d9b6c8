"""The benchmark's scorers, named on the command line as NAME or NAME=FOLDER:

    world_reward     the embedded world's reward (higher is better)
    world_fidelity   the embedded world's distance to the data (lower is better)
    pickscore=DIR, hpsv2=DIR, clip_score=DIR, aesthetic=DIR, imagereward=DIR    pnapo_jax.rewards, folder
                     layouts there

Every folder is checked for the files its layout needs before anything samples (one line naming the folder,
the missing file and the layout), then loaded.
"""

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from pnapo_jax.errors import UserError

WORLD = ("world_reward", "world_fidelity")
FILES = {"pickscore": ("config.json",), "clip_score": ("config.json",),
         "hpsv2": ("open_clip_config.json", "open_clip_model.safetensors"),
         "aesthetic": ("config.json", "aesthetic_mlp.safetensors"), "imagereward": ("med_config.json",)}
NEEDS_TOKENIZER = ("pickscore", "clip_score", "hpsv2")
LAYOUTS = {"pickscore": "transformers CLIPModel + CLIP tokenizer", "clip_score": "transformers CLIPModel + CLIP "
           "tokenizer", "hpsv2": "open_clip conversion + CLIP tokenizer", "aesthetic": "CLIP ViT-L/14 + LAION MLP",
           "imagereward": "ImageReward.pt (or .safetensors) + med_config.json + BERT vocab.txt"}
KINDS = (*WORLD, *FILES)


@dataclasses.dataclass(frozen=True)
class Scorer:
    name: str
    score: Callable[[np.ndarray, Sequence[str]], np.ndarray]  # (images [B, H, W, 3] in [0, 1], prompts) -> [B]
    higher_is_better: bool = True


def parse(spec: str) -> list[tuple[str, str]]:
    """'world_reward,hpsv2=DIR' -> [(kind, folder or "")], each folder checked."""
    out = []
    for item in [s for s in spec.split(",") if s]:
        name, _, path = item.partition("=")
        if name not in KINDS:
            raise UserError(f"--scorers: unknown scorer {name!r}; choose from {KINDS}")
        if name in WORLD and path:
            raise UserError(f"--scorers: {name} takes no folder")
        if name in FILES:
            if not path:
                raise UserError(f"--scorers: {name} needs its weights folder: {name}=DIR ({LAYOUTS[name]})")
            folder = pathlib.Path(path)
            missing = [f for f in FILES[name] if not (folder / f).is_file()]
            if name == "imagereward":
                if not any((folder / f).is_file() for f in ("ImageReward.pt", "ImageReward.safetensors")):
                    missing.append("ImageReward.pt (or ImageReward.safetensors)")
                if not any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
                    missing.append("the BERT tokenizer (vocab.txt or tokenizer.json)")
            elif name != "hpsv2" and not any(folder.glob("model*.safetensors")):
                missing.append("model.safetensors")
            tokenizer = (folder / "tokenizer.json").is_file() or all((folder / f).is_file()
                                                                    for f in ("vocab.json", "merges.txt"))
            if name in NEEDS_TOKENIZER and not tokenizer:
                missing.append("the CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt)")
            if missing:
                raise UserError(f"--scorers: {name}={path}: missing {', '.join(missing)} (expected a {name} folder: "
                                f"{LAYOUTS[name]}, see pnapo_jax/rewards)")
        out.append((name, path))
    if not out:
        raise UserError("--scorers: no scorers given")
    if len({n for n, _ in out}) < len(out):
        raise UserError(f"--scorers: a scorer appears twice: {[n for n, _ in out]}")
    return out


def load(name: str, path: str) -> Scorer:
    if name == "world_reward":
        from pnapo_jax.world import reward

        return Scorer(name, reward.reward)
    if name == "world_fidelity":
        from pnapo_jax.world import fidelity

        return Scorer(name, fidelity.fidelity, higher_is_better=False)
    from pnapo_jax import rewards

    return Scorer(name, rewards.load_reward(name, path, "float32"))
