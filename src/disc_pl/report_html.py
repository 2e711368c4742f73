"""``report.html``: one self-contained static page to browse a sweep (no server, no network).

- the method table: every row of the report's statistics (reference rows included: a row is
  anything :func:`write_html` is given) and every figure they hold (a new key becomes a new
  column), each ``mean ± std``; a click on a header sorts by that column (inline JS, numeric
  on the mean; missing values last). ``report.html#sort=<column>`` or ``#sort=<column>:desc``
  sorts on load (``window.sortTable(column, descending)`` does it from a script);
- per query: the query and, side by side, each method's counterfactual and change heatmap,
  with its status, target probability and (when the results have one) the judge's verdict;
  every heatmap of the page shares one scale (colour bar with its maximum);
- checkboxes filter the counterfactuals by status (``flipped``, ``not_flipped``, ``diverged``, ...);
- where the results have ``in_mask`` / ``on_cue``: where the change went (mouth / planted cue /
  elsewhere), one stacked bar per method.

Images are embedded as PNG data URIs at their own resolution and shown at >= 96 px with
nearest-neighbour scaling (CSS ``image-rendering: pixelated``), so the page stays small.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from disc_pl.figures import load_counterfactuals, load_rows
from disc_pl.viz import caption, change, colormap, colour_bar, upscale_factor

# Keys of a statistics row that are not figures (shown first, or not as columns).
LABEL_KEYS = ("method",)


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _tensor_png(x: Tensor) -> str:
    """``[C, H, W]`` in [0, 1] at its own resolution (the browser upscales, nearest neighbour)."""
    x = x.float().clamp(0, 1)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    return _png(Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy(), "RGB"))


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def table_columns(stats: Sequence[Mapping[str, Any]],
                  preferred: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """(header, key) of every figure in any row: ``preferred`` first (in their order, if any
    row has them), then every other numeric or (mean, std) key that some row has a value for,
    in first-seen order."""
    def is_figure(v: Any) -> bool:
        if isinstance(v, (tuple, list)) and len(v) == 2:
            return all(isinstance(x, (int, float)) or x is None for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def has_value(v: Any) -> bool:
        return _number(v[0] if isinstance(v, (tuple, list)) else v) is not None

    present = [k for s in stats for k, v in s.items() if k not in LABEL_KEYS and is_figure(v)]
    seen: dict[str, None] = dict.fromkeys(present)
    out = [(h, k) for h, k in preferred if k in seen]
    # other figures: only where some row has a value (the report's unused CD references stay out)
    out += [(k, k) for k in seen if k not in {k for _, k in preferred} and any(has_value(s.get(k)) for s in stats)]
    return out


def _cell(v: Any) -> tuple[str, float | None]:
    """(text, sort value) of one table cell."""
    if isinstance(v, (tuple, list)):
        mean, std = (_number(v[0]), _number(v[1]))
        if mean is None:
            return "–", None
        return (f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.3g}"), mean
    n = _number(v)
    if n is None:
        return "–", None
    return (str(int(n)) if float(n).is_integer() and abs(n) >= 1 else f"{n:.3g}"), n


def method_table(stats: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    head = "".join(f'<th data-key="{html.escape(k)}" onclick="sortTable(\'{html.escape(k)}\')">'
                   f'{html.escape(h)} <span class="arrow"></span></th>' for h, k in columns)
    body = []
    for s in stats:
        cells = []
        for _, k in columns:
            text, value = _cell(s.get(k))
            cells.append(f'<td data-value="{"" if value is None else repr(value)}">{html.escape(text)}</td>')
        name = str(s.get("method", "?"))
        ref = ' class="reference"' if s.get("reference") else ""
        body.append(f'<tr data-method="{html.escape(name)}"{ref}><td class="name">{html.escape(name)}</td>'
                    + "".join(cells) + "</tr>")
    return (f'<table id="methods"><thead><tr><th data-key="method" onclick="sortTable(\'method\')">Method '
            f'<span class="arrow"></span></th>{head}</tr></thead><tbody>\n' + "\n".join(body) + "\n</tbody></table>")


def query_sections(methods: Sequence[tuple[str, Sequence[Path]]], max_queries: int) -> tuple[str, list[str], float]:
    """(HTML of the per-query rows, statuses present, shared change maximum)."""
    loaded = [(name, load_counterfactuals(dirs), {int(r["query_id"]): r for r in load_rows(dirs)})
              for name, dirs in methods]
    loaded = [m for m in loaded if m[1]]
    ids = sorted(set().union(*(set(cfs) for _, cfs, _ in loaded)))[:max_queries] if loaded else []
    vmax = max((float(change(cfs[q][0][None], cfs[q][1][None]).max()) for _, cfs, _ in loaded for q in ids
                if q in cfs), default=0.0)
    statuses: dict[str, None] = {}
    rows = []
    for q in ids:
        query = next(cfs[q][0] for _, cfs, _ in loaded if q in cfs)
        size = upscale_factor(max(query.shape[-2:])) * max(query.shape[-2:])
        cells = [f'<td class="q"><img src="{_tensor_png(query)}" width="{size}" height="{size}" alt="query {q}">'
                 f'<div class="cap">query {q}</div></td>']
        for name, cfs, results in loaded:
            if q not in cfs:
                cells.append('<td class="cf" data-status="missing"><div class="cap">not run</div></td>')
                continue
            x, x_cf = cfs[q]
            r = results.get(q, {})
            status = str(r.get("status", "unknown"))
            statuses[status] = None
            heat = colormap(change(x[None], x_cf[None]) / max(vmax, 1e-8))[0]
            verdict_key = next((k for k in r if "verdict" in k), None)
            text = [f"{status}"] + caption(_number(r.get("target_prob")), r.get(verdict_key) if verdict_key else None)
            if _number(r.get("mse")) is not None:
                text.append(f"mse={float(r['mse']):.3g}")
            cells.append(f'<td class="cf" data-status="{html.escape(status)}" title="{html.escape(name)}">'
                         f'<img src="{_tensor_png(x_cf)}" width="{size}" height="{size}" alt="{html.escape(name)}">'
                         f'<img src="{_tensor_png(heat)}" width="{size}" height="{size}" alt="change">'
                         f'<div class="cap">{"<br>".join(html.escape(t) for t in text)}</div></td>')
        rows.append(f'<tr data-query="{q}">' + "".join(cells) + "</tr>")
    head = "<th>query</th>" + "".join(f"<th>{html.escape(n)}<br><small>counterfactual | change</small></th>"
                                      for n, _, _ in loaded)
    return (f'<table id="queries"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows) + "\n</tbody></table>",
            list(statuses), vmax)


# Where the change went (issue 28): (label, stats key, colour); "elsewhere" is the rest.
WHERE = (("mouth", "in_mask", "#2ca02c"), ("cue", "on_cue", "#c000c0"))
ELSEWHERE_COLOUR = "#bbbbbb"


def change_split(s: Mapping[str, Any]) -> list[tuple[str, float, str]] | None:
    """[(label, share, colour)] of a statistics row's mean change: the mouth (``in_mask``), the
    planted cue (``on_cue``) where the row has them, elsewhere the rest (the two masks are
    disjoint, so per query and in the mean the parts sum to 1); None with neither."""
    parts = []
    for label, key, colour in WHERE:
        v = s.get(key)
        share = _number(v[0] if isinstance(v, (tuple, list)) else v)
        if share is not None:
            parts.append((label, share, colour))
    if not parts:
        return None
    return parts + [("elsewhere", max(0.0, 1.0 - sum(p for _, p, _ in parts)), ELSEWHERE_COLOUR)]


def where_bars(stats: Sequence[Mapping[str, Any]]) -> str:
    """One stacked bar per row with :func:`change_split` (HTML / CSS only); "" when none has."""
    bars = []
    for s in stats:
        parts = change_split(s)
        if parts is None:
            continue
        spans = "".join(f'<span style="width:{100 * share:.1f}%;background:{colour}" '
                        f'title="{label} {share:.3g}"></span>' for label, share, colour in parts)
        text = ", ".join(f"{label} {share:.2f}" for label, share, _ in parts)
        bars.append(f'<tr><td class="name">{html.escape(str(s.get("method", "?")))}</td>'
                    f'<td><div class="bar">{spans}</div></td><td>{html.escape(text)}</td></tr>')
    if not bars:
        return ""
    legend = " ".join(f'<span class="key" style="background:{c}"></span>{label}'
                      for label, _, c in (*WHERE, ("elsewhere", "", ELSEWHERE_COLOUR)))
    return ('<h2>Where the change went</h2><p>Share of sum |x\' - x| per region, mean over the flipped '
            f"queries: {legend}</p>\n" + '<table class="where"><tbody>' + "\n".join(bars) + "</tbody></table>")


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
#methods th { cursor: pointer; background: #f0f0f0; user-select: none; }
#methods td.name, #methods th:first-child { text-align: left; }
#methods tr.reference { background: #fff8e0; font-style: italic; }
#queries td { text-align: center; }
#queries img { image-rendering: pixelated; image-rendering: crisp-edges; margin: 1px; }
.cap { font-size: 11px; line-height: 1.3; }
.hidden { display: none; }
.where td.name { text-align: left; }
.bar { display: flex; width: 300px; height: 14px; border: 1px solid #999; }
.bar span { display: block; height: 100%; }
.key { display: inline-block; width: 12px; height: 12px; margin: 0 3px 0 10px; vertical-align: middle; }
td.cf.off > * { visibility: hidden; }
#filters label { margin-right: 1em; }
"""

SCRIPT = """
function sortValue(row, key) {
  if (key === 'method') return row.dataset.method.toLowerCase();
  const th = document.querySelector('#methods th[data-key="' + key + '"]');
  const cell = row.children[Array.from(th.parentNode.children).indexOf(th)];
  return cell.dataset.value === '' ? null : parseFloat(cell.dataset.value);
}
window.sortTable = function (key, descending) {
  const th = document.querySelector('#methods th[data-key="' + key + '"]');
  if (!th) return false;
  if (descending === undefined) descending = th.dataset.order === 'asc';  // a second click reverses
  const body = document.querySelector('#methods tbody');
  const rows = Array.from(body.rows);
  rows.sort(function (a, b) {
    const x = sortValue(a, key), y = sortValue(b, key);
    if (x === null && y === null) return 0;
    if (x === null) return 1;               // missing values last, either direction
    if (y === null) return -1;
    const c = x < y ? -1 : x > y ? 1 : 0;
    return descending ? -c : c;
  });
  rows.forEach(function (r) { body.appendChild(r); });
  document.querySelectorAll('#methods th').forEach(function (h) {
    h.dataset.order = ''; h.querySelector('.arrow').textContent = '';
  });
  th.dataset.order = descending ? 'desc' : 'asc';
  th.querySelector('.arrow').textContent = descending ? '\\u25bc' : '\\u25b2';
  document.body.dataset.sorted = key + (descending ? ':desc' : ':asc');
  return true;
};
window.applyFilters = function () {
  const checked = document.querySelectorAll('#filters input:checked');
  const on = new Set(Array.from(checked).map(function (i) { return i.value; }));
  document.querySelectorAll('#queries tbody tr').forEach(function (row) {
    let any = false;
    row.querySelectorAll('td.cf').forEach(function (td) {
      const show = on.has(td.dataset.status);
      td.classList.toggle('off', !show);
      any = any || show;
    });
    row.classList.toggle('hidden', !any);
  });
};
function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const sort = params.get('sort');
  if (sort) { const [key, dir] = sort.split(':'); sortTable(key, dir === 'desc'); }
  const status = params.get('status');
  if (status !== null) {
    const keep = new Set(status.split(','));
    document.querySelectorAll('#filters input').forEach(function (i) { i.checked = keep.has(i.value); });
    applyFilters();
  }
}
window.addEventListener('hashchange', fromHash);
document.addEventListener('DOMContentLoaded', fromHash);
"""


def write_html(path: Path, title: str, stats: Sequence[Mapping[str, Any]],
               methods: Sequence[tuple[str, Sequence[Path]]], preferred: Sequence[tuple[str, str]] = (),
               notes: Sequence[str] = (), max_queries: int = 200) -> Path:
    """Write ``report.html``: ``stats`` are the table rows (a ``reference: true`` row is shown as a
    reference), ``methods`` the (name, job dirs) whose counterfactuals are browsed."""
    columns = table_columns(stats, preferred)
    queries, statuses, vmax = query_sections(methods, max_queries)
    filters = "".join(f'<label><input type="checkbox" value="{html.escape(s)}" checked onchange="applyFilters()">'
                      f"{html.escape(s)}</label>" for s in statuses)
    bar = _png(colour_bar(140, vmax))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Methods</h2>
<p>Click a column header to sort (again to reverse). Mean ± population std.</p>
{method_table(stats, columns)}
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
{where_bars(stats)}
<h2>Counterfactuals</h2>
<div id="filters">Show status: {filters}</div>
<p><img src="{bar}" alt="change colour bar" style="vertical-align: middle"> every change heatmap on this page
shares one scale: |x' - x| (max over channels) from 0 to {vmax:.3g}.</p>
{queries}
</body></html>
"""
    Path(path).write_text(page)
    return Path(path)

