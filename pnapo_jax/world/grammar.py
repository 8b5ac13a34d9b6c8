"""The world's prompt grammar: "<count> <colour> <shape>[s] <position>", e.g. "two red circles on the left".

4 colours x 3 shapes x 3 counts x 5 positions = 180 prompts. The split tests composition, not vocabulary:
a prompt is held out when its (colour, shape) pair is one of HELD_OUT_PAIRS (red triangle, green square,
blue circle), so every word is seen in training but these three bindings never are (135 train prompts,
45 held-out). Both lists are in grammar order, so the split is the same on every machine.

For choosing training settings without looking at the held-out prompts, the train prompts split again the same
way: "train_val" is the train prompts of VAL_PAIRS (yellow circle, red square: 30 prompts), "train_fit" the
other 105. A run tuned there generates its pairs on train_fit and evaluates on train_val.
"""

import dataclasses
import itertools

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
COUNTS = {"a": 1, "two": 2, "three": 3}
POSITIONS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "center": "in the center"}
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "square"), ("blue", "circle"))
VAL_PAIRS = (("yellow", "circle"), ("red", "square"))  # train bindings set aside for tuning
SPLITS = ("train", "heldout", "all", "train_fit", "train_val")
PAD = "<pad>"
VOCAB = (PAD, *COUNTS, *COLOURS, *(w for s in SHAPES for w in (s, s + "s")),
         *dict.fromkeys(w for p in POSITIONS.values() for w in p.split()))  # id = index; PAD is 0


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt's meaning: what the renderer draws and the reward checks."""

    count: int
    colour: str
    shape: str
    position: str

    @property
    def text(self) -> str:
        word = next(w for w, n in COUNTS.items() if n == self.count)
        return f"{word} {self.colour} {self.shape}{'s' if self.count > 1 else ''} {POSITIONS[self.position]}"

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def split(self) -> str:
        """The finest split this prompt is in: heldout, train_val or train_fit."""
        if self.heldout:
            return "heldout"
        return "train_val" if (self.colour, self.shape) in VAL_PAIRS else "train_fit"


def all_prompts() -> list[Prompt]:
    """Every prompt of the grammar, in grammar order."""
    return [Prompt(COUNTS[n], c, s, p) for n, c, s, p in itertools.product(COUNTS, COLOURS, SHAPES, POSITIONS)]


_BY_TEXT = {p.text: p for p in all_prompts()}


def prompts(split: str = "train") -> list[str]:
    """Prompt texts of a split: "train", "heldout" (unseen colour-shape bindings), "all", or the train prompts'
    "train_fit" / "train_val" (for tuning)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    within = {"all": ("heldout", "train_fit", "train_val"), "train": ("train_fit", "train_val")}.get(split, (split,))
    return [p.text for p in all_prompts() if p.split() in within]


def parse(text: str) -> Prompt:
    """The meaning of a prompt text; ValueError for text outside the grammar."""
    try:
        return _BY_TEXT[text]
    except KeyError:
        raise ValueError(f"not a prompt of the world's grammar: {text!r}") from None
