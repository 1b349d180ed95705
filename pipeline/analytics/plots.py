"""Figures of a sweep as PNG: robust accuracy against eps and against RDC timesteps, clean
against robust accuracy, perturbation-norm histograms, and a grid of example images.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas (no pyplot, no global
backend, no display needed), at fixed sizes so that a file's pixel size is known in advance:
FIGSIZE x DPI for the charts, and for the image grid EXAMPLE_COLUMN_INCHES per column and
EXAMPLE_ROW_INCHES per example. Every function returns [(file name, PNG bytes)]; `write_plots`
writes them into a folder, the HTML page inlines them.
"""

from __future__ import annotations

import io
import json
import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline.analytics.render import format_eps
from pipeline.analytics.report import headline, summarize
from pipeline.analytics.source import Source, as_connection
from pipeline.data import load_split
from pipeline.errors import DatasetError
from pipeline.names import safe_name
from pipeline.store.adversarial import FOLDER, read_adversarial

FIGSIZE = (8.0, 5.0)
DPI = 100
"""Charts are FIGSIZE inches at DPI: 800 x 500 pixels."""
EXAMPLE_COLUMN_INCHES = 2.4
EXAMPLE_ROW_INCHES = 2.6
EXAMPLE_COLUMNS = 3  # clean, adversarial, perturbation
T = 1000  # diffusion timesteps of the VP schedule (docs/ARCHITECTURE.md, "The grid"): what RDC's "all" means
NORM_COLUMN = {"Linf": "linf", "L2": "l2", "L1": "l1"}

Plot = tuple[str, bytes]


def _eps_name(eps: float, norm: str) -> str:
    return safe_name(format_eps(eps, norm).replace("/", "_"))


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": that would change the pixel size
    return buf.getvalue()


LEGEND_BESIDE = 8
"""Up to this many entries the legend stands beside the chart; more go below it, in columns."""
LEGEND_MAX = 24
"""More entries than this would not fit the fixed-size figure legibly: the rest are counted in the last one."""
LEGEND_WRAP = 48  # characters per legend line


def _legend(fig: Figure, ax) -> None:
    """The figure's legend, sized to stay inside the fixed-size figure and leave the chart most of it:
    beside the chart for a few entries, below it in up to four columns of smaller type for more,
    long labels wrapped, and entries past LEGEND_MAX summed up in one."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) > LEGEND_MAX:
        extra = len(handles) - (LEGEND_MAX - 1)
        handles, labels = handles[:LEGEND_MAX - 1], labels[:LEGEND_MAX - 1]
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(f"... and {extra} more (see the summary table)")
    labels = [textwrap.fill(label, LEGEND_WRAP) for label in labels]
    if len(handles) <= LEGEND_BESIDE:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small")
        return
    ncols = min(3, math.ceil(len(handles) / 6))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="xx-small" if ncols > 2 else "x-small")


def _chart() -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _yerr(rows: Sequence[dict], acc: str = "robust_acc", lo: str = "robust_lo", hi: str = "robust_hi") -> np.ndarray:
    return np.array([[100 * (r[acc] - r[lo]) for r in rows], [100 * (r[hi] - r[acc]) for r in rows]])


def robust_vs_eps(summary: Sequence[dict]) -> list[Plot]:
    """One chart per threat model (norm): robust accuracy (%) against eps, one line per
    (defense, attack, path) with 95% Wilson intervals as error bars. Each line starts at eps 0
    with the clean accuracy of its smallest budget's examples."""
    plots = []
    for norm in sorted({r["norm"] for r in summary if r["eps"] > 0}):
        lines: dict[tuple, list[dict]] = {}
        for r in summary:
            if r["norm"] == norm and r["eps"] > 0:
                lines.setdefault((r["defense"], r["attack"], r["path"]), []).append(r)
        fig, ax = _chart()
        for (defense, attack, path), rows in sorted(lines.items()):
            rows = sorted(rows, key=lambda r: r["eps"])
            first = rows[0]
            xs = [0.0] + [r["eps"] for r in rows]
            ys = [100 * first["clean_acc"]] + [100 * r["robust_acc"] for r in rows]
            err = np.concatenate([_yerr([first], "clean_acc", "clean_lo", "clean_hi"), _yerr(rows)], axis=1)
            label = f"{defense} / {attack}" + ("" if path == "adaptive" else f" ({path})")
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ticks = sorted({0.0} | {r["eps"] for rows in lines.values() for r in rows})
        ax.set_xticks(ticks, [format_eps(t, norm) for t in ticks], rotation=45)
        ax.set_xlabel(f"{norm} budget eps (0: clean)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Robust accuracy (first pass) against eps per attack and path ({norm}), 95% Wilson",
                     fontsize="medium")
        ax.grid(alpha=0.3)
        _legend(fig, ax)
        plots.append((f"robust_vs_eps-{safe_name(norm)}.png", _png(fig)))
    return plots


def headline_vs_eps(rows: Sequence[dict]) -> list[Plot]:
    """One chart per threat model: the headline robust accuracy (%) against eps, one line per
    defense (report.ROBUST_RULE: worst over attacks and paths, first pass), 95% Wilson intervals."""
    plots = []
    for norm in sorted({r["norm"] for r in rows}):
        lines: dict[str, list[dict]] = {}
        for r in rows:
            if r["norm"] == norm:
                lines.setdefault(r["defense"], []).append(r)
        fig, ax = _chart()
        for defense, own in sorted(lines.items()):
            own = sorted(own, key=lambda r: r["eps"])
            ax.errorbar([r["eps"] for r in own], [100 * r["robust_acc"] for r in own], yerr=_yerr(own), marker="o",
                        capsize=3, label=defense)
        ticks = sorted({r["eps"] for own in lines.values() for r in own})
        ax.set_xticks(ticks, [format_eps(t, norm) for t in ticks], rotation=45)
        ax.set_xlabel(f"{norm} budget eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Robust accuracy ({norm}): first pass, worst over attacks and paths; 95% Wilson", fontsize="medium")
        ax.grid(alpha=0.3)
        _legend(fig, ax)
        plots.append((f"headline-{safe_name(norm)}.png", _png(fig)))
    return plots


def rdc_timesteps(plans: Sequence[Mapping], names: Sequence[str] = ()) -> dict[str, tuple[str, int]]:
    """{defense name: (family, timesteps)} for RDC defenses: from the plans' defense tables
    ("all" is T = 1000; an int n is n; a list is its length; pruned defenses are left out),
    else from a name carrying `timesteps=N` (a swept defense). The family is the table without
    its timesteps (its name without the timesteps=... part): the defenses one curve joins."""
    found: dict[str, tuple[str, int]] = {}
    for plan in plans:
        for unit in plan.get("units", []):
            table, name = unit.get("defense_table", {}), unit.get("defense")
            if table.get("kind") != "rdc" or table.get("pruning") or name in found:
                continue
            ts = table.get("timesteps", "all")
            n = T if ts == "all" else len(ts) if isinstance(ts, list) else int(ts)
            found[name] = (_family(name), n)
    for name in names:
        m = re.search(r"timesteps=(\d+)", name)
        if name not in found and m:
            found[name] = (_family(name), int(m.group(1)))
    return found


def _family(name: str) -> str:
    """The name without its timesteps: rdc-optimal[temperature=1,timesteps=10] -> rdc-optimal[temperature=1]."""
    base, _, rest = name.partition("[")
    if not rest:
        return base
    parts = [p for p in rest.rstrip("]").split(",") if p and not p.startswith("timesteps=")]
    return base + (f"[{','.join(parts)}]" if parts else "")


def robust_vs_timesteps(summary: Sequence[dict], timesteps: Mapping[str, tuple[str, int]]) -> list[Plot]:
    """One chart per threat model: robust accuracy (%) against the number of RDC timesteps
    (log axis), one line per (family, attack, eps), Wilson error bars. Only families run at
    two or more timestep counts make a line; no line, no chart."""
    plots = []
    for norm in sorted({r["norm"] for r in summary}):
        lines: dict[tuple, list[tuple[int, dict]]] = {}
        for r in summary:
            if r["norm"] == norm and r["defense"] in timesteps:
                family, n = timesteps[r["defense"]]
                lines.setdefault((family, r["attack"], r["eps"]), []).append((n, r))
        lines = {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items() if len({n for n, _ in v}) >= 2}
        if not lines:
            continue
        fig, ax = _chart()
        for (family, attack, eps), points in sorted(lines.items()):
            rows = [r for _, r in points]
            ax.errorbar([n for n, _ in points], [100 * r["robust_acc"] for r in rows], yerr=_yerr(rows), marker="o",
                        capsize=3, label=f"{family} / {attack} / {format_eps(eps, norm)}")
        ax.set_xscale("log")
        ax.set_xlabel("RDC timesteps per class (log scale)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Robust accuracy against RDC timesteps ({norm}), 95% Wilson intervals")
        ax.grid(alpha=0.3, which="both")
        _legend(fig, ax)
        plots.append((f"robust_vs_timesteps-{safe_name(norm)}.png", _png(fig)))
    return plots


def clean_vs_robust(summary: Sequence[dict]) -> list[Plot]:
    """One bar chart per (norm, eps > 0): for each defense, its clean accuracy and its robust
    accuracy under each attack at that budget, with Wilson error bars."""
    plots = []
    for norm, eps in sorted({(r["norm"], r["eps"]) for r in summary if r["eps"] > 0}):
        rows = [r for r in summary if r["norm"] == norm and r["eps"] == eps]
        defenses = sorted({r["defense"] for r in rows})
        attacks = sorted({r["attack"] for r in rows})
        width = 0.8 / (1 + len(attacks))
        fig, ax = _chart()
        x = np.arange(len(defenses))
        clean = [max((r for r in rows if r["defense"] == d), key=lambda r: r["n"]) for d in defenses]
        ax.bar(x, [100 * r["clean_acc"] for r in clean], width, yerr=_yerr(clean, "clean_acc", "clean_lo", "clean_hi"),
               capsize=3, label="clean", color="0.6")
        for i, attack in enumerate(attacks, start=1):
            got = {r["defense"]: r for r in rows if r["attack"] == attack}
            have = [j for j, d in enumerate(defenses) if d in got]
            sub = [got[defenses[j]] for j in have]
            ax.bar(x[have] + i * width, [100 * r["robust_acc"] for r in sub], width, yerr=_yerr(sub), capsize=3,
                   label=f"robust: {attack}")
        ax.set_xticks(x + width * len(attacks) / 2, defenses, rotation=20, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"Clean and robust accuracy, {norm} eps {format_eps(eps, norm)}")
        ax.grid(alpha=0.3, axis="y")
        _legend(fig, ax)
        plots.append((f"clean_vs_robust-{safe_name(norm)}-{_eps_name(eps, norm)}.png", _png(fig)))
    return plots


def norm_histograms(source: Source) -> list[Plot]:
    """One chart per defense: histograms of the perturbation size in each attack's own norm
    (one panel per norm), a series per (attack, eps), the budget as a dashed line."""
    con, owned = as_connection(source)
    try:
        found = con.execute("""
            SELECT defense, attack, norm, eps, list(CASE norm WHEN 'Linf' THEN linf WHEN 'L2' THEN l2 ELSE l1 END)
            FROM results WHERE eps > 0 GROUP BY ALL ORDER BY defense, norm, attack, eps
        """).fetchall()
    finally:
        if owned:
            con.close()
    by_defense: dict[str, list[tuple]] = {}
    for defense, attack, norm, eps, values in found:
        by_defense.setdefault(defense, []).append((attack, norm, eps, np.asarray(values, dtype=np.float64)))
    plots = []
    for defense, series in by_defense.items():
        norms = sorted({s[1] for s in series})
        fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(norms)))
        for ax, norm in zip(axes, norms):
            mine = [s for s in series if s[1] == norm]
            top = max(max(s[2] for s in mine), max(float(s[3].max()) if s[3].size else 0.0 for s in mine))
            bins = np.linspace(0, top * 1.05 if top > 0 else 1.0, 41)
            for i, (attack, _, eps, values) in enumerate(mine):
                color = f"C{i % 10}"
                ax.hist(values, bins=bins, histtype="step", linewidth=1.5, color=color,
                        label=f"{attack} {format_eps(eps, norm)} (n={values.size})")
                ax.axvline(eps, color=color, linestyle="--", linewidth=1)
            ax.set_xlabel(f"{norm} norm of the perturbation (dashed: eps)")
            ax.set_ylabel("examples")
            ax.legend(fontsize="x-small")
        fig.suptitle(f"Perturbation sizes: {defense}")
        plots.append((f"norms-{safe_name(defense)}.png", _png(fig)))
    return plots


def choose_examples(source: Source, available: set[tuple[str, str]] | None = None, per_defense: int = 6) -> dict[str, list[dict]]:
    """Examples to show per defense: broken ones first (clean right, adversarial wrong), at the
    largest budget, then by example id. available: (run_id, unit_id) pairs whose adversarial
    images exist (None: all). Returns {defense: [record fields]}."""
    con, owned = as_connection(source)
    try:
        found = con.execute("""
            SELECT run_id, unit_id, example_id, label, defense, attack, norm, eps, clean_pred, adv_pred,
                   clean_correct, adv_correct, linf, l2, l1
            FROM results WHERE eps > 0
            ORDER BY defense, (clean_correct AND NOT adv_correct) DESC, eps DESC, attack, example_id
        """).fetchall()
    finally:
        if owned:
            con.close()
    keys = ("run_id", "unit_id", "example_id", "label", "defense", "attack", "norm", "eps", "clean_pred",
            "adv_pred", "clean_correct", "adv_correct", "linf", "l2", "l1")
    chosen: dict[str, list[dict]] = {}
    for values in found:
        row = dict(zip(keys, values))
        if available is not None and (row["run_id"], row["unit_id"]) not in available:
            continue
        picked = chosen.setdefault(row["defense"], [])
        if len(picked) < per_defense and all(p["example_id"] != row["example_id"] for p in picked):
            picked.append(row)
    return chosen


def _show(ax, image: np.ndarray) -> None:
    """Draw a (C, H, W) image in [0, 1]: grey for one channel, RGB for three."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(defense: str, examples: Sequence[dict], clean: Mapping[int, np.ndarray],
                 adversarial: Mapping[tuple, np.ndarray]) -> Plot:
    """One image grid: a row per example with its clean image (true label, clean prediction),
    adversarial image (attack, eps, prediction) and the perturbation magnified to fill the
    grey scale (grey 0.5 is no change; the factor is in the title).

    clean: {example_id: (C, H, W)}; adversarial: {(run_id, unit_id, example_id): (C, H, W)}.
    Size: EXAMPLE_COLUMNS x EXAMPLE_COLUMN_INCHES by len(examples) x EXAMPLE_ROW_INCHES, at DPI.
    """
    rows = len(examples)
    fig = Figure(figsize=(EXAMPLE_COLUMNS * EXAMPLE_COLUMN_INCHES, rows * EXAMPLE_ROW_INCHES), dpi=DPI,
                 layout="constrained")
    axes = np.asarray(fig.subplots(rows, EXAMPLE_COLUMNS)).reshape(rows, EXAMPLE_COLUMNS)
    for (ax_clean, ax_adv, ax_delta), ex in zip(axes, examples):
        x = clean[ex["example_id"]]
        x_adv = adversarial[(ex["run_id"], ex["unit_id"], ex["example_id"])]
        delta = x_adv - x
        peak = float(np.abs(delta).max())
        factor = 0.5 / peak if peak > 0 else 1.0
        _show(ax_clean, x)
        ax_clean.set_title(f"#{ex['example_id']} label {ex['label']}\nclean pred {ex['clean_pred']}", fontsize=9)
        _show(ax_adv, x_adv)
        verdict = "right" if ex["adv_correct"] else "WRONG"
        ax_adv.set_title(f"{ex['attack']} {format_eps(ex['eps'], ex['norm'])}\nadv pred {ex['adv_pred']} ({verdict})",
                         fontsize=9)
        _show(ax_delta, np.clip(0.5 + factor * delta, 0, 1))
        norm_value = ex[NORM_COLUMN.get(ex["norm"], "linf")]
        ax_delta.set_title(f"perturbation x{factor:.3g}\n{ex['norm']} {norm_value:.4g}", fontsize=9)
    fig.suptitle(f"Examples: {defense}")
    return f"examples-{safe_name(defense)}.png", _png(fig)


def example_grids(source: Source, runs: Sequence[tuple], per_defense: int = 6) -> tuple[list[Plot], list[str]]:
    """Image grids, one per defense with stored adversarial images: (plots, notes).

    runs: (store, plan or None) per run folder. Adversarial images come from each run's
    adversarial/ side files (pipeline.store.adversarial); clean images from the dataset the
    plan names (pipeline.data.load_split). Notes say what could not be drawn and why.
    """
    notes: list[str] = []
    files: dict[tuple[str, str], tuple] = {}
    data_of: dict[str, dict] = {}
    for store, plan in runs:
        rels = store.list(FOLDER, ".parquet")
        if not rels:
            notes.append(f"{store.uri}: no adversarial images stored (runs before they were kept have none)")
            continue
        if plan is None:
            notes.append(f"{store.uri}: no plan.json, so the clean images' dataset is unknown")
            continue
        run_id = plan["run_id"]
        data_of[run_id] = plan["job"]["data"]
        for rel in rels:
            unit_id = rel.rsplit("unit-", 1)[-1].removesuffix(".parquet")
            files[(run_id, unit_id)] = (store, rel)
    if not files:
        return [], notes
    chosen = choose_examples(source, set(files), per_defense)
    needed = {(e["run_id"], e["unit_id"]) for picked in chosen.values() for e in picked}
    adversarial: dict[tuple, np.ndarray] = {}
    for key in needed:
        store, rel = files[key]
        ids, images, _ = read_adversarial(store, rel)
        for i, image in zip(ids.tolist(), images):
            adversarial[(key[0], key[1], i)] = image
    splits: dict[str, np.ndarray] = {}
    plots = []
    for defense, examples in chosen.items():
        runs_used = {e["run_id"] for e in examples}
        if len({json.dumps(data_of[r], sort_keys=True) for r in runs_used}) > 1:
            examples = [e for e in examples if e["run_id"] == examples[0]["run_id"]]
        data = data_of[examples[0]["run_id"]]
        key = json.dumps(data, sort_keys=True)
        if key not in splits:
            try:
                x, _ = load_split(data["dataset"], data["split"], root=data.get("root"))
            except DatasetError as exc:
                notes.append(f"{defense}: clean images unavailable ({exc})")
                continue
            splits[key] = x.numpy()
        x = splits[key]
        clean = {e["example_id"]: x[e["example_id"]] for e in examples}
        plots.append(example_grid(defense, examples, clean, adversarial))
    return plots, notes


def all_plots(source: Source, *, plans: Sequence[Mapping] = (), runs: Sequence[tuple] = (),
              summary: Sequence[dict] | None = None, heads: Sequence[dict] | None = None,
              per_defense: int = 6) -> tuple[list[Plot], list[str]]:
    """Every figure this module draws, in a stable order, and the notes of what was skipped.
    summary, heads: `summarize(source)`, `headline(source)` if already computed."""
    con, owned = as_connection(source)
    try:
        summary = list(summary) if summary is not None else summarize(con)
        heads = list(heads) if heads is not None else headline(con)
        names = sorted({r["defense"] for r in summary})
        plots = headline_vs_eps(heads)
        plots += robust_vs_eps(summary)
        plots += robust_vs_timesteps(summary, rdc_timesteps(plans, names))
        plots += clean_vs_robust(summary)
        plots += norm_histograms(con)
        grids, notes = example_grids(con, runs, per_defense) if runs else ([], [])
        plots += grids
    finally:
        if owned:
            con.close()
    return plots, notes


def write_plots(plots: Sequence[Plot], folder: str | Path) -> list[Path]:
    """Write PNGs into `folder` (created if missing); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in plots:
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths
