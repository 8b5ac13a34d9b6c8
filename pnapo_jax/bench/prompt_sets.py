"""Prompt sets from the files users have, as (prompts, per-prompt categories).

    text       .txt      one prompt a line (blank lines refused: they would shift every later prompt's seeds)
    hpdv2      .json     HPDv2's benchmark prompts: {"anime": [...], "photo": [...], ...} (style -> prompts), or
                         one style's file, a JSON list (the style is then the file's stem)
    parti      .tsv      PartiPrompts: columns Prompt, Category, Challenge (and Note, ignored)
    drawbench  .csv      DrawBench: columns Prompts, Category
    rows       .jsonl / .parquet   dataset rows (open-image-preferences, Pick-a-Pic test): the `prompt` or
                         `caption` column (or --prompt_column); category / subcategory / style columns where
                         present. Repeated prompts are kept once (Pick-a-Pic has several rows per caption).
    world      world:SPLIT         the embedded world's prompts (train | heldout | all), by colour and shape

The format comes from the extension unless named (`read(path, fmt)`); anything else is one UserError line.
"""

import csv
import dataclasses
import io
import json
import pathlib

from etils import epath

from pnapo_jax.errors import UserError

FORMATS = ("text", "hpdv2", "parti", "drawbench", "rows", "world")
_BY_EXTENSION = {".txt": "text", ".json": "hpdv2", ".tsv": "parti", ".csv": "drawbench", ".jsonl": "rows",
                 ".parquet": "rows"}
PROMPT_COLUMNS = ("prompt", "caption")  # open-image-preferences, Pick-a-Pic
CATEGORY_COLUMNS = ("category", "subcategory", "style", "challenge")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts in file order and, per breakdown (e.g. "category"), one label per prompt."""

    name: str
    prompts: list[str]
    categories: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def detect_format(path: str) -> str:
    """The format named by `path`'s extension (or the world: prefix)."""
    if path.startswith("world:"):
        return "world"
    fmt = _BY_EXTENSION.get(pathlib.PurePath(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown prompt file format; expected one of {sorted(_BY_EXTENSION)} "
                        f"(formats {', '.join(FORMATS)}) or world:SPLIT")
    return fmt


def read(path: str, fmt: str = "", prompt_column: str = "") -> PromptSet:
    """The prompt set in `path` (format `fmt`, default by extension); UserError for what cannot be read."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise UserError(f"--prompt_format={fmt!r}: choose from {FORMATS}")
    if fmt == "world":
        out = _world(path.removeprefix("world:"))
    else:
        file = epath.Path(path)  # local or gs://
        if not file.is_file():
            raise UserError(f"{path}: prompt file not found")
        reader = {"text": _text, "hpdv2": _hpdv2, "parti": _table, "drawbench": _table, "rows": _rows}[fmt]
        out = reader(file, prompt_column) if fmt == "rows" else reader(file)
    if not out.prompts:
        raise UserError(f"{path}: no prompts in it ({fmt} format)")
    return out


def _text(file: epath.Path) -> PromptSet:
    lines = file.read_text().splitlines()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise UserError(f"{file}: blank prompt on line(s) {blank[:5]} (text format: one prompt a line)")
    return PromptSet(file.stem, [line.strip() for line in lines])


def _hpdv2(file: epath.Path) -> PromptSet:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: not JSON ({e.msg} at line {e.lineno}); hpdv2 format: {{style: [prompts]}}") from None
    if isinstance(data, list):
        data = {file.stem: data}
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                             for v in data.values()):
        raise UserError(f"{file}: hpdv2 format is a JSON object {{style: [prompt, ...]}} or a list of prompts")
    styles = [(style, p) for style, prompts in data.items() for p in prompts]
    return PromptSet(file.stem, [p for _, p in styles], {"style": [s for s, _ in styles]})


def _pick(columns: list[str], wanted: tuple[str, ...]) -> dict[str, str]:
    """Our lower-case name -> the file's column, for the `wanted` names the file has (any capitalisation)."""
    lower = {c.strip().lower(): c for c in columns}
    return {w: lower[w] for w in wanted if w in lower}


def _table(file: epath.Path) -> PromptSet:
    """PartiPrompts' TSV or DrawBench's CSV: a header row, a Prompt(s) column, category columns."""
    delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
    rows = list(csv.DictReader(io.StringIO(file.read_bytes().decode("utf-8-sig")), delimiter=delimiter))
    columns = list(rows[0]) if rows else []
    prompt_col = _pick(columns, ("prompt", "prompts"))
    if not prompt_col:
        raise UserError(f"{file}: no Prompt or Prompts column in the header {columns} (PartiPrompts TSV / "
                        "DrawBench CSV)")
    col = next(iter(prompt_col.values()))
    empty = [i + 2 for i, r in enumerate(rows) if not (r[col] or "").strip()]
    if empty:
        raise UserError(f"{file}: empty {col} on line(s) {empty[:5]}")
    cats = _pick(columns, CATEGORY_COLUMNS)
    return PromptSet(file.stem, [r[col].strip() for r in rows],
                     {name: [(r[c] or "").strip() for r in rows] for name, c in cats.items()})


def _read_rows(file: epath.Path) -> list[dict]:
    if file.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq  # only for parquet files

        return pq.read_table(io.BytesIO(file.read_bytes())).to_pylist()
    rows = []
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{file}: line {i} is not JSON ({e.msg})") from None
    return rows


def _rows(file: epath.Path, prompt_column: str = "") -> PromptSet:
    rows = _read_rows(file)
    columns = list(rows[0]) if rows else []
    col = prompt_column or next((c for c in PROMPT_COLUMNS if c in columns), "")
    if col not in columns:
        wanted = repr(prompt_column) if prompt_column else f"one of {PROMPT_COLUMNS}"
        raise UserError(f"{file}: no prompt column {wanted} among {columns} (--prompt_column names it)")
    first = {}
    for i, r in enumerate(rows):
        if not isinstance(r.get(col), str) or not r[col].strip():
            raise UserError(f"{file}: row {i + 1} has no text in column {col!r}")
        first.setdefault(r[col].strip(), r)
    cats = [c for c in CATEGORY_COLUMNS if c in columns]
    return PromptSet(file.stem, list(first), {c: [str(r.get(c, "")) for r in first.values()] for c in cats})


def _world(split: str) -> PromptSet:
    from pnapo_jax.world import grammar

    if split not in grammar.SPLITS:
        raise UserError(f"world:{split}: the embedded world's splits are {grammar.SPLITS}")
    prompts = grammar.prompts(split)
    parsed = [grammar.parse(p) for p in prompts]
    return PromptSet(f"world-{split}", prompts, {"colour": [p.colour for p in parsed],
                                                 "shape": [p.shape for p in parsed],
                                                 "count": [str(p.count) for p in parsed]})
