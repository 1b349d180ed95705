"""One self-contained HTML page of a sweep: the report's tables, the comparisons, the
RobustBench entries and every figure, with the PNGs inline as data: URIs.

No script, no stylesheet or font from elsewhere: the file opens offline in any browser and
can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Mapping, Sequence

from pipeline.analytics.render import TITLES, cells, flagged

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; }
.notes { color: #855; font-size: 0.9em; }
tr.flagged td { background: #fde8e8; }
"""


def table_html(section: str, rows: Sequence[dict]) -> str:
    """A <table> of one report section (the same cells as the text formats); a row whose sweep
    is flagged gets the class "flagged"."""
    headers, numeric, body = cells(section, rows)
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    marks = [flagged(r) for r in rows] if section in ("headline", "summary") else [False] * len(body)
    lines = [("<tr class=\"flagged\">" if mark else "<tr>") + "".join(f'<td class="num">{esc(c)}</td>' if num else f"<td>{esc(c)}</td>"
                              for c, num in zip(line, numeric)) + "</tr>" for line, mark in zip(body, marks)]
    return (f'<table class="report" data-section="{esc(section)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(lines)}</tbody></table>")


def image_html(name: str, png: bytes) -> str:
    """A <figure> with the PNG inline (data: URI) and its file name as caption."""
    data = base64.b64encode(png).decode("ascii")
    esc = html.escape(name)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{esc}"><figcaption>{esc}</figcaption></figure>'


def page(report: Mapping[str, Sequence[dict]], plots: Sequence[tuple[str, bytes]] = (), *,
         title: str = "robustsweep report", sources: Sequence[str] = (),
         comparisons: Sequence[Sequence[dict]] = (), robustbench: Sequence[Mapping] = (),
         notes: Sequence[str] = ()) -> str:
    """The whole page as a string (UTF-8 HTML5).

    report: {section: rows} (build_report); plots: [(name, PNG bytes)] (plots.all_plots);
    comparisons: lists of compare() rows; robustbench: export.robustbench_entries() rows;
    sources: the run folders shown in the header; notes: what the figures had to leave out.
    """
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts.append(f"<p>Runs: {', '.join(f'<code>{esc(s)}</code>' for s in sources) or '(records table)'}; "
                 f"made {when}. Accuracies in %, intervals are 95% Wilson score intervals.</p>")
    for name, rows in report.items():
        parts.append(f"<h2>{esc(TITLES[name])}</h2>")
        parts.append(table_html(name, rows) if rows else "<p>(none)</p>")
    for rows in comparisons:
        if rows:
            parts.append(f"<h2>{esc(TITLES['compare'])}: {esc(rows[0]['a'])} vs {esc(rows[0]['b'])} "
                         f"({esc(rows[0]['metric'])})</h2>")
            parts.append(table_html("compare", rows))
    if robustbench:
        parts.append("<h2>RobustBench-style entries</h2>")
        keys = ["name", "dataset", "threat_model", "eps", "n_examples", "clean_acc", "robust_acc", "autoattack_acc",
                "external", "number_forward_passes"]
        head = "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{esc('' if e.get(k) is None else str(e.get(k)))}</td>" for k in keys)
                       + "</tr>" for e in robustbench)
        parts.append(f'<table class="report" data-section="robustbench"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table>")
    if plots:
        parts.append("<h2>Figures</h2>")
        parts += [image_html(name, png) for name, png in plots]
    if notes:
        parts.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
