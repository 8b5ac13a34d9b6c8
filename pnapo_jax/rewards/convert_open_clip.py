"""An open_clip .pt checkpoint (HPSv2's HPS_v2.1_compressed.pt) -> the safetensors state dict the hpsv2 reward
loads. Run once; it needs PyTorch, the reward does not.

    python -m pnapo_jax.rewards.convert_open_clip --in=HPS_v2.1_compressed.pt --out=DIR/open_clip_model.safetensors

The checkpoint is read with torch.load(weights_only=True), which refuses to unpickle anything but tensors and
plain containers. It may be the state dict itself or a dict holding it under "state_dict" (HPSv2's), with keys
perhaps prefixed "module." (saved from DistributedDataParallel). Beside the output, an open_clip_config.json
with open_clip's ViT-H-14 config (HPSv2's architecture) is written unless one is already there.
"""

import json
import os
import pathlib
import pickle

from absl import flags

from pnapo_jax import cli
from pnapo_jax.errors import UserError
from pnapo_jax.rewards import open_clip_layout


def convert(src: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write `src`'s state dict to `out` (and a default config beside it); returns the number of tensors."""
    try:
        import safetensors.torch
        import torch
    except ImportError:
        raise UserError("converting a .pt checkpoint needs PyTorch: pip install torch") from None
    if not pathlib.Path(src).is_file():
        raise UserError(f"--in={src} is not a file (an open_clip .pt checkpoint)")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{src} is not a checkpoint of tensors and plain containers; not loaded: "
                        f"{str(e).splitlines()[0]}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{src} holds no state dict of tensors (nor one under 'state_dict')")
    state = {k.removeprefix("module."): v.detach().clone().contiguous() for k, v in state.items()}
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, out)
    config = out.parent / open_clip_layout.CONFIG_NAME
    if not config.exists():
        config.write_text(json.dumps({"model_cfg": open_clip_layout.VIT_H_14}, indent=2))
    return len(state)


def _main(argv: list[str]) -> None:
    src, out = flags.FLAGS["in"].value, flags.FLAGS["out"].value
    print(f"wrote {convert(src, out)} tensors to {out}", flush=True)


def run() -> None:
    flags.DEFINE_string("in", None, "open_clip checkpoint (.pt).")
    flags.DEFINE_string("out", None, "Output .safetensors file (the reward folder's open_clip_model.safetensors).")
    flags.mark_flags_as_required(["in", "out"])
    cli.run(_main)


if __name__ == "__main__":
    run()
