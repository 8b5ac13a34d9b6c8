"""Names: our Flax param paths <-> diffusers state-dict keys.

Our modules are named after diffusers', with `.N` list indices folded into the name (`to_out.0` ->
`to_out_0`); a Linear's `weight` is our `kernel` transposed and an RMSNorm's `weight` is our `scale`.
"""

import re

_INDEXED = ("transformer_blocks", "single_transformer_blocks", "to_out", "net")
_INDEXED_RE = re.compile(rf"^({'|'.join(_INDEXED)})_(\d+)$")


def flax_to_diffusers(path: tuple[str, ...]) -> tuple[str, bool]:
    """(per-layer Flax path) -> (diffusers key, whether the tensor is transposed between the two)."""
    *mods, leaf = path
    parts = []
    for m in mods:
        match = _INDEXED_RE.match(m)
        parts.extend(match.groups() if match else (m,))
    if leaf == "kernel":
        return ".".join([*parts, "weight"]), True
    if leaf == "scale":
        return ".".join([*parts, "weight"]), False
    return ".".join([*parts, leaf]), False
