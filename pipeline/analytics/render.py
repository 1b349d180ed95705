"""Report sections as text: rich tables, Markdown, CSV and JSON.

Text formats (rich, Markdown, the HTML page) show formatted cells: percentages with one
decimal, intervals as [lo, hi], eps as k/255 where it is one. Data formats (CSV, JSON) keep the
raw values: fractions, floats, and nested fields flattened as `field.key` in CSV.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping, Sequence

from rich.table import Table
from rich.text import Text

from pipeline.analytics.report import ROBUST_RULE, SECTIONS, stage_order

TITLES = {
    "headline": f"Robust accuracy: {ROBUST_RULE} (95% Wilson)",
    "summary": "Accuracy per defense, attack and budget (robust: first of the R passes; 95% Wilson intervals)",
    "classes": "Robust accuracy per class (%)",
    "stages": "Attack stage that broke each example",
    "cost": "Cost per example",
    "prediction": "Predicted against recorded cost (the run's predicted.json; network evaluations and device-seconds)",
    "flags": "Sanity flags",
    "compare": "Paired comparison on the same examples (per attack, and each defense's worst case over all its attacks)",
}
"""Heading of each report section."""

NAME_COLUMNS = ("defense", "attack", "A", "B")
NAME_WIDTH = 48

Column = tuple[str, Callable[[dict], str], bool]  # (header, cell of a row, numeric: right-aligned)


def format_eps(eps: float | None, norm: str | None = None) -> str:
    """eps as people write it: k/255 for Linf budgets on that grid (8/255), else 4 significant digits."""
    if eps is None:
        return ""
    if norm == "Linf" and 0 < eps < 1 and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:.4g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _interval(acc: float, lo: float, hi: float) -> str:
    return f"{_pct(acc)} [{_pct(lo)}, {_pct(hi)}]"


def _amount(v, fmt: str = ".6g") -> str:
    return str(v) if isinstance(v, int) else format(v, fmt)


def _span(pair, fmt: str = ".6g") -> str:
    """[lo, hi] as one number when exact, lo-hi when a range; "-" when there is none."""
    if pair is None or None in pair:
        return "-"
    lo, hi = pair
    return _amount(lo, fmt) if lo == hi else f"{_amount(lo, fmt)}-{_amount(hi, fmt)}"


def _in_range(row: Mapping) -> str:
    if row["in_range"] is None:
        return "-"
    return "yes" if row["in_range"] else f"NO ({row['units_outside']} of {row['units']} units)"


def _group_columns() -> list[Column]:
    return [("defense", lambda r: str(r["defense"]), False), ("attack", lambda r: str(r["attack"]), False),
            ("path", lambda r: str(r["path"]), False), ("norm", lambda r: str(r["norm"]), False),
            ("eps", lambda r: format_eps(r["eps"], r["norm"]), True)]


FLAG_MARK = "(!) "
"""Put before the defense of a row whose sweep is flagged (pipeline.flags)."""


def flagged(row: Mapping) -> bool:
    """Whether a headline or summary row carries a sweep flag."""
    return bool(row.get("sweep_flags"))


def _marked(row: Mapping, text: str) -> str:
    return FLAG_MARK + text if flagged(row) else text


def columns(section: str, rows: Sequence[dict]) -> list[Column]:
    """The columns of a section's text rendering (stages: one column per stage seen in rows)."""
    group = _group_columns()
    if section == "headline":
        return [
            ("defense", lambda r: _marked(r, str(r["defense"])), False), ("norm", lambda r: str(r["norm"]), False),
            ("eps", lambda r: format_eps(r["eps"], r["norm"]), True), ("n", lambda r: str(r["n"]), True),
            ("robust % [95% CI]", lambda r: _interval(r["robust_acc"], r["robust_lo"], r["robust_hi"]), True),
            ("vote %", lambda r: _pct(r["vote_acc"]), True),
            ("all-passes %", lambda r: _pct(r["all_passes_acc"]), True),
            ("attacks", lambda r: ", ".join(r["attacks"]), False),
            ("sweep flags", lambda r: ", ".join(r["sweep_flags"]), False),
        ]
    if section == "summary":
        group = [("defense", lambda r: _marked(r, str(r["defense"])), False)] + group[1:]
        return group + [
            ("n", lambda r: str(r["n"]), True),
            ("clean % [95% CI]", lambda r: _interval(r["clean_acc"], r["clean_lo"], r["clean_hi"]), True),
            ("robust % [95% CI]", lambda r: _interval(r["robust_acc"], r["robust_lo"], r["robust_hi"]), True),
            ("vote %", lambda r: _pct(r["vote_acc"]), True),
            ("all-passes %", lambda r: _pct(r["all_passes_acc"]), True),
            ("fwd/ex", lambda r: f"{r['forward_per_example']:.1f}", True),
            ("bwd/ex", lambda r: f"{r['backward_per_example']:.1f}", True),
            ("s/ex", lambda r: f"{r['seconds_per_example']:.3g}", True),
            ("flags", lambda r: ", ".join(f"{k}: {v}" for k, v in sorted(r["flags"].items())), False),
            ("sweep flags", lambda r: ", ".join(r.get("sweep_flags", [])), False),
        ]
    if section == "classes":
        return group + [
            ("label", lambda r: str(r["label"]), True), ("class", lambda r: str(r.get("class", r["label"])), False),
            ("n", lambda r: str(r["n"]), True),
            ("clean %", lambda r: _pct(r["clean_acc"]), True),
            ("robust % [95% CI]", lambda r: _interval(r["robust_acc"], r["robust_lo"], r["robust_hi"]), True),
        ]
    if section == "stages":
        seen = stage_order({s for r in rows for s in r["broken_by"]})
        return group + [("n", lambda r: str(r["n"]), True)] + [
            (stage, lambda r, s=stage: str(r["broken_by"].get(s, 0)), True) for stage in seen
        ] + [("survived", lambda r: str(r["survived"]), True)]
    if section == "cost":
        return group + [
            ("n", lambda r: str(r["n"]), True),
            ("device-s", lambda r: f"{r['device_seconds']:.4g}", True),
            ("s/ex", lambda r: f"{r['seconds_per_example']:.3g}", True),
            ("fwd/ex", lambda r: f"{r['forward_per_example']:.1f}", True),
            ("bwd/ex", lambda r: f"{r['backward_per_example']:.1f}", True),
            ("calls/ex", lambda r: f"{r['calls_per_example']:.1f}", True),
            ("queries/ex", lambda r: f"{r['queries_per_example']:.1f}", True),
            ("grads/ex", lambda r: f"{r['gradients_per_example']:.1f}", True),
            ("devices", lambda r: ", ".join(r["devices"]), False),
            ("workers", lambda r: str(r["workers"]), True),
        ]
    if section == "prediction":
        return [
            ("run", lambda r: str(r["run_id"]), False), ("defense", lambda r: str(r["defense"]), False),
            ("attack", lambda r: str(r["attack"]), False), ("eps", lambda r: format_eps(r["eps"], r["norm"]), True),
            ("units", lambda r: str(r["units"]), True), ("n", lambda r: str(r["n"]), True),
            ("fwd predicted", lambda r: _span(r["forward_predicted"]), True),
            ("fwd recorded", lambda r: _amount(r["forward_recorded"]), True),
            ("bwd predicted", lambda r: _span(r["backward_predicted"]), True),
            ("bwd recorded", lambda r: _amount(r["backward_recorded"]), True),
            ("in range", _in_range, False),
            ("s predicted", lambda r: _span(r["seconds_predicted"], ".3g"), True),
            ("s recorded", lambda r: f"{r['seconds_recorded']:.3g}", True),
            ("recorded/predicted s", lambda r: _span(r["seconds_ratio"], ".3g"), True),
            ("device", lambda r: r["device"] or "", False),
            # the reason in full is in the data formats (and, for a damaged prediction, in the notes)
            ("note", lambda r: r["note"].split(":", 1)[0], False),
        ]
    if section == "flags":
        return group + [("flag", lambda r: str(r["flag"]), False), ("rows", lambda r: str(r["count"]), True),
                        ("% of rows", lambda r: _pct(r["fraction"]), True)]
    if section == "compare":
        level = f"{100 * rows[0]['level']:g}%" if rows else "95%"
        return [
            ("attack", lambda r: str(r["attack"]), False), ("path", lambda r: str(r.get("path", "")), False),
            ("norm", lambda r: str(r["norm"]), False),
            ("eps", lambda r: format_eps(r["eps"], r["norm"]), True), ("n", lambda r: str(r["n"]), True),
            ("A", lambda r: str(r["a"]), False), ("A %", lambda r: _pct(r["acc_a"]), True),
            ("B", lambda r: str(r["b"]), False), ("B %", lambda r: _pct(r["acc_b"]), True),
            (f"A - B (pp) [{level} bootstrap]", lambda r: _interval(r["diff"], r["diff_lo"], r["diff_hi"]), True),
            ("A only", lambda r: str(r["n10"]), True), ("B only", lambda r: str(r["n01"]), True),
            ("McNemar exact p", lambda r: f"{r['p_value']:.3g}", True),
            ("chi2 (cc) p", lambda r: f"{r['chi2_p_value']:.3g}", True),
        ]
    raise ValueError(f"unknown report section {section!r}; choose from {list(SECTIONS)}")


WIDE_CLASSES = 20
"""Up to this many labels, the text formats show per-class accuracy as one column per label."""


def _classes_wide(rows: Sequence[dict]) -> tuple[list[str], list[bool], list[list[str]]]:
    # One row per group, one column per label: a sweep of 10-class runs reads at a glance,
    # and a table of a few hundred rows renders fast (BENCHMARKS.md, "Report over a million rows").
    labels = sorted({r["label"] for r in rows})
    group = _group_columns()
    by_group: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        by_group.setdefault(tuple(r[k] for k in ("defense", "attack", "path", "norm", "eps")), {})[r["label"]] = r
    named = {r["label"]: r.get("class", str(r["label"])) for r in rows}
    headers = [c[0] for c in group] + ["n"] + [str(label) if named[label] == str(label) else f"{label} {named[label]}"
                                                for label in labels]
    body = []
    for per_label in by_group.values():
        first = next(iter(per_label.values()))
        body.append([c[1](first) for c in group] + [str(sum(r["n"] for r in per_label.values()))] +
                    [_pct(per_label[label]["robust_acc"]) if label in per_label else "" for label in labels])
    return headers, [c[2] for c in group] + [True] * (1 + len(labels)), body


def cells(section: str, rows: Sequence[dict]) -> tuple[list[str], list[bool], list[list[str]]]:
    """(headers, numeric flags, cell rows) of a section: what every text format shows.

    Per-class rows are pivoted (one column of robust % per label) when there are at most
    WIDE_CLASSES labels; the CSV and JSON keep one row per group and label."""
    if section == "classes" and len({r["label"] for r in rows}) <= WIDE_CLASSES:
        return _classes_wide(rows)
    cols = columns(section, rows)
    return [c[0] for c in cols], [c[2] for c in cols], [[c[1](r) for c in cols] for r in rows]


def render_section(section: str, rows: Sequence[dict], title: str | None = None) -> Table:
    """A rich table of one report section."""
    headers, numeric, body = cells(section, rows)
    # Cells are Text, never console markup: names carry [sweep=suffixes], and a name such as
    # "[/x]" would otherwise raise or vanish.
    table = Table(title=Text(title) if title is not None else None)
    for i, (h, num) in enumerate(zip(headers, numeric)):
        # Text folds rather than ending in "...": two sweep variants cut to one prefix would read
        # as the same row. Names keep their full width (up to NAME_WIDTH) before anything folds.
        width = min(max((len(line[i]) for line in body), default=0), NAME_WIDTH) if h in NAME_COLUMNS else None
        table.add_column(Text(h), justify="right" if num else "left", no_wrap=num, overflow="fold", min_width=width)
    for line in body:
        table.add_row(*(Text(c) for c in line))
    return table


def render_table(rows: Sequence[dict], title: str | None = None) -> Table:
    """A rich table of `summarize` rows (percentages with one decimal, intervals as [lo, hi])."""
    return render_section("summary", rows, title)


def render_tables(report: Mapping[str, Sequence[dict]]) -> list[Table]:
    """One titled rich table per section of a `build_report` result."""
    return [render_section(name, rows, TITLES[name]) for name, rows in report.items()]


def section_markdown(section: str, rows: Sequence[dict]) -> str:
    """A GitHub-flavoured Markdown table of one section."""
    headers, numeric, body = cells(section, rows)

    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    out = [line(headers), "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    out += [line(values) for values in body]
    return "\n".join(out) + "\n"


def to_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of `summarize` rows (the same cells as `render_table`)."""
    return section_markdown("summary", rows)


def report_markdown(report: Mapping[str, Sequence[dict]]) -> str:
    """Every section of a report as a Markdown heading (###) and table."""
    parts = [f"### {TITLES[name]}\n\n{section_markdown(name, rows)}" for name, rows in report.items()]
    return "\n".join(parts)


def _flatten(row: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        elif isinstance(v, (list, tuple)):
            out[name] = ";".join(map(str, v))
        else:
            out[name] = v
    return out


def to_csv(rows: Sequence[dict]) -> str:
    """CSV of one section's raw rows: a header line, then one line per row. Nested fields become
    `field.key` columns (flags.zero_gradient, broken_by.apgd-ce; absent counts are 0), lists
    are joined with ';'. Floats are written in full precision."""
    flat = [_flatten(r) for r in rows]
    header: list[str] = []
    for r in flat:
        header += [k for k in r if k not in header]
    nested = {k for k in header if "." in k}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in flat:
        writer.writerow([r.get(k, 0 if k in nested else "") for k in header])
    return buf.getvalue()


def to_json(report: Mapping[str, Sequence[dict]]) -> str:
    """The report as JSON: {section: [row, ...]} with raw values (fractions in [0, 1])."""
    return json.dumps(report, indent=2)
