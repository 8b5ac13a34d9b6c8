"""report.html: one row per (prompt, seed), the models' images side by side with their scores under each, and a
sort by the largest difference from the baseline on any scorer. A static page (relative image paths, inline
script, no server, nothing fetched) that opens from disk; after the page loads, its body carries
data-images-loaded / data-images-total, so a browser test can check that every image showed."""

import html

import numpy as np
from etils import epath

from pnapo_jax.bench.prompt_sets import PromptSet
from pnapo_jax.bench.results import Scores

_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table.results { border-collapse: collapse; }
table.results td, table.results th { border: 1px solid #ccc; padding: 4px; vertical-align: top; font-size: 12px; }
td.img img { width: 160px; image-rendering: pixelated; display: block; }
td.prompt { max-width: 260px; }
.cat { color: #666; }
"""

_SCRIPT = """
function sortRows() {
  const key = document.getElementById('sort').value;
  const body = document.querySelector('#rows tbody');
  const rows = Array.from(body.rows);
  rows.sort((a, b) => key === 'order' ? a.dataset.order - b.dataset.order
                                      : Math.abs(b.dataset[key]) - Math.abs(a.dataset[key]));
  rows.forEach(r => body.appendChild(r));
}
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
"""


def _key(model: str, scorer: str) -> str:
    """A data-* attribute name (dataset key camel-cases after '-', so only letters and digits)."""
    clean = lambda s: "".join(c for c in s.lower() if c.isalnum())
    return f"d{clean(model)}x{clean(scorer)}"


def render(summary: dict, tables_md: str, scores: Scores, prompt_set: PromptSet,
           image_paths: dict[str, list[list[str]]]) -> str:
    """The page's HTML (`tables_md`: results.md, shown on top); `image_paths` are relative to the page."""
    models, baseline = list(scores), summary["baseline"]
    scorers = list(summary["scorers"])
    P, N = np.shape(scores[models[0]][scorers[0]])
    esc = html.escape
    options = ['<option value="order">prompt order</option>']
    for m in models:
        for s in scorers:
            if m != baseline:
                options.append(f'<option value="{_key(m, s)}">largest |{esc(s)} difference|: {esc(m)} vs '
                               f'{esc(baseline)}</option>')
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    rows = []
    for p in range(P):
        cats = " ".join(f'<span class="cat">{esc(b)}: {esc(v[p])}</span>' for b, v in prompt_set.categories.items())
        for k in range(N):
            diffs = " ".join(f'data-{_key(m, s)}="{scores[m][s][p, k] - scores[baseline][s][p, k]:.6g}"'
                             for m in models if m != baseline for s in scorers)
            cells = []
            for m in models:
                text = "<br>".join(f"{esc(s)} {scores[m][s][p, k]:.4g}" for s in scorers)
                cells.append(f'<td class="img"><img src="{esc(image_paths[m][p][k])}" alt="{esc(m)} {p}/{k}">'
                             f"{text}</td>")
            rows.append(f'<tr data-order="{p * N + k}" {diffs}><td class="prompt">{esc(prompt_set.prompts[p])}'
                        f"<br>seed {k} {cats}</td>{''.join(cells)}</tr>")
    title = f"{esc(summary['prompt_set'])}: {', '.join(map(esc, models))}"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<pre id="summary">{esc(tables_md)}</pre>
<p>sort rows by <select id="sort" onchange="sortRows()">{''.join(options)}</select></p>
<table class="results" id="rows"><thead><tr><th>prompt</th>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_SCRIPT}</script>
</body></html>
"""


def write(out: epath.Path, summary: dict, tables_md: str, scores: Scores, prompt_set: PromptSet,
          image_paths: dict[str, list[list[str]]]) -> epath.Path:
    path = out / "report.html"
    path.write_text(render(summary, tables_md, scores, prompt_set, image_paths))
    return path
