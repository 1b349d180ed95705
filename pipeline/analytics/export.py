"""RobustBench model cards: one JSON per defense, threat model and budget, in the layout of
RobustBench's `model_info/{dataset}/{threat_model}/{model}.json` entries.

A written file holds RobustBench's keys, in its order and units (accuracies as percent strings
with two decimals, eps as written in papers, e.g. "8/255", number_forward_passes a number,
additional_data a bool):

    link, name, authors, additional_data, number_forward_passes, dataset, venue, architecture,
    eps, clean_acc, reported, autoattack_acc, [external], footnote

and what a sweep knows beyond them under one key, "robustsweep" (threat_model, n_examples,
robust_acc, rule, attacks, autoattack_attacks, vote_acc, all_passes_acc, passes, defense_table,
eps_value). The robust figure is the report's headline (pipeline.analytics.report: ROBUST_RULE,
worst over attacks and paths, first of the R passes), over the same examples:

- autoattack_acc: that rule over the AutoAttack runs only; when other attacks ran too (PGD,
  transfer, the oblivious path), the figure over all of them is `external`, the field
  RobustBench's leaderboard ranks by before autoattack_acc (an evaluation stronger than its own).
  When no AutoAttack ran, autoattack_acc is null and `external` holds the figure.
- clean_acc: the share of the examples classified correctly without attack (the first pass;
  every record of the example must say so).
- number_forward_passes: network evaluations per prediction of the defense, measured on the
  scoring passes and kept in the footer of the run's adversarial-images files
  (pipeline.store.adversarial); null for runs without them.
- architecture and additional_data describe the defense's model as the run's plan.json records
  it (`models`, written by runtime/run.py from each checkpoint's config.json); null or
  "unknown model" where the plan does not say.

Which attacks are AutoAttack comes from the run's plan.json (attack kind "autoattack"), else
from the default attack name prefix "aa-".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline.analytics.render import format_eps
from pipeline.analytics.report import ROBUST_COLUMN, ROBUST_RULE, headline
from pipeline.analytics.source import Source, as_connection
from pipeline.names import safe_name
from pipeline.store import Store
from pipeline.store.adversarial import FOLDER, adversarial_path
from pipeline.store.adversarial import forward_per_prediction


def attack_kinds(plans: Sequence[Mapping]) -> dict[str, str]:
    """{attack name: kind} from the units of the plans (autoattack, pgd, transfer, none)."""
    kinds = {}
    for plan in plans:
        for unit in plan.get("units", []):
            kinds.setdefault(unit["attack"], unit.get("attack_table", {}).get("kind", ""))
    return kinds


def defense_tables(plans: Sequence[Mapping]) -> dict[str, dict]:
    """{defense name: its table} from the units of the plans."""
    tables = {}
    for plan in plans:
        for unit in plan.get("units", []):
            tables.setdefault(unit["defense"], unit.get("defense_table", {}))
    return tables


def forward_passes(runs: Sequence[tuple]) -> dict[str, float]:
    """{defense name: network evaluations per prediction} from the footers of the runs'
    adversarial-images files (one footer read per defense and run); where runs disagree (they
    should not) the mean."""
    found: dict[str, list[float]] = {}
    for store, plan in runs:
        stored = set(store.list(FOLDER, ".parquet")) if plan is not None else set()
        seen = set()
        for unit in plan.get("units", []) if stored else []:
            rel = adversarial_path(unit["path"])
            if unit["defense"] in seen or rel not in stored:
                continue  # one unit per defense is enough: the count is a property of the defense
            value = forward_per_prediction(store, rel)
            if value is not None:
                found.setdefault(unit["defense"], []).append(value)
                seen.add(unit["defense"])
    return {d: sum(v) / len(v) for d, v in found.items()}


# How exports name the architectures of pipeline/models/registry.py; an unknown one is shown as written.
ARCHITECTURES = {"cnn": "SmallCNN", "resnet18": "ResNet-18", "unet": "UNet"}


def model_cards(plans: Sequence[Mapping]) -> dict[str, dict]:
    """{defense name: model card} from the plans (runtime/run.py writes them; older plans have none)."""
    cards = {}
    for plan in plans:
        for name, card in plan.get("models", {}).items():
            cards.setdefault(name, card)
    return cards


def architecture(table: Mapping, card: Mapping) -> str:
    """The defense and the model it stands on, in words: e.g. "SmallCNN (mixup) + MI-PL",
    "RDC on a class-conditional UNet + LM"; a model the plan does not describe is "unknown"."""
    kind = table.get("kind")
    arch = card.get("arch")
    model = ARCHITECTURES.get(arch, arch) if arch else f"unknown model ({table.get('model', 'default')})"
    if kind == "plain":
        return f"{model} ({table.get('method', 'erm')})"
    if kind == "mi":
        return f"{model} ({table.get('method', 'mixup')}) + MI-{table.get('mode', 'pl').upper()}"
    if kind == "rdc":
        base = "the optimal eps model" if table.get("model") == "optimal" else f"a class-conditional {model}"
        return f"RDC on {base}" + (" + LM" if table.get("lm") is not None else "")
    return ""


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.2f}"


def _pct_of(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def robustbench_entries(source: Source, *, plans: Sequence[Mapping] = (), runs: Sequence[tuple] = ()) -> list[dict]:
    """One entry per (defense, norm, eps > 0), the report's headline rows with what RobustBench's
    layout asks beside them (see the module docstring); `robustbench_json` makes the file."""
    kinds = attack_kinds(plans)
    tables = defense_tables(plans)
    cards = model_cards(plans)
    dataset = next((p["job"]["data"]["dataset"] for p in plans if "job" in p), "unknown")
    passes = forward_passes(runs)
    con, owned = as_connection(source)
    try:
        head = headline(con)
        names = [r[0] for r in con.execute("SELECT DISTINCT attack FROM results").fetchall()]
        aa = [a for a in names if (kinds.get(a) == "autoattack" if a in kinds else a.startswith("aa-"))]
        # The headline's examples and rows (every attack but `clean`, eps > 0), so that n and the
        # figure are the headline's; AutoAttack's share among them beside it.
        found = {(d, n, e): rest for d, n, e, *rest in con.execute(f"""
            WITH per AS (
                SELECT defense, norm, eps, example_id, bool_and(clean_correct) AS clean,
                       bool_and({ROBUST_COLUMN}) FILTER (WHERE list_contains($aa, attack)) AS aa_ok,
                       max(passes) AS r
                FROM results WHERE attack <> 'clean' AND eps > 0 GROUP BY ALL)
            SELECT defense, norm, eps, count_if(clean), count(aa_ok), count_if(aa_ok), max(r)
            FROM per GROUP BY ALL
        """, {"aa": aa}).fetchall()}
    finally:
        if owned:
            con.close()
    entries = []
    for h in head:
        defense, norm, eps, n = h["defense"], h["norm"], h["eps"], h["n"]
        clean_k, n_aa, aa_k, r = found[(defense, norm, eps)]
        used = sorted({a.rsplit(" (", 1)[0] for a in h["attacks"]})
        table, card = tables.get(defense, {}), cards.get(defense, {})
        robust = _pct_of(h["robust_acc"])
        others = [a for a in used if a not in aa]
        footnote = (f"robustsweep: robust accuracy = {ROBUST_RULE}; attacks {', '.join(h['attacks'])}"
                    + (f"; R = {r} scoring passes" if r > 1 else ""))
        if n_aa and n_aa < n:
            footnote += f"; AutoAttack ran on {n_aa} of the {n} examples"
        entries.append({
            "name": defense, "dataset": dataset, "threat_model": norm, "eps": format_eps(eps, norm),
            "clean_acc": _pct(clean_k, n), "robust_acc": robust,
            "autoattack_acc": _pct(aa_k, n_aa) if n_aa else None,
            "external": robust if (others or not n_aa) else None,
            "number_forward_passes": passes.get(defense), "n_examples": int(n),
            "additional_data": card.get("additional_data"), "architecture": architecture(table, card),
            "link": "", "authors": "", "venue": "", "reported": "", "footnote": footnote,
            "rule": ROBUST_RULE, "vote_acc": _pct_of(h["vote_acc"]), "all_passes_acc": _pct_of(h["all_passes_acc"]),
            "passes": int(r), "attacks": used, "autoattack_attacks": [a for a in used if a in aa],
            "defense_table": table, "eps_value": eps,
        })
    return entries


RB_KEYS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue", "architecture",
           "eps", "clean_acc", "reported", "autoattack_acc", "external", "footnote")
"""The keys of a RobustBench model_info entry, in its files' order (external only when set)."""
EXTRA_KEYS = ("threat_model", "n_examples", "robust_acc", "rule", "attacks", "autoattack_attacks", "vote_acc",
              "all_passes_acc", "passes", "defense_table", "eps_value")


def robustbench_json(entry: Mapping) -> dict:
    """The file of an entry: RobustBench's keys (RB_KEYS) and units, the rest under "robustsweep"."""
    doc = {k: entry.get(k) for k in RB_KEYS if not (k == "external" and entry.get(k) is None)}
    fwd = doc["number_forward_passes"]
    if isinstance(fwd, float) and fwd.is_integer():
        doc["number_forward_passes"] = int(fwd)  # RobustBench writes whole counts as integers
    doc["robustsweep"] = {k: entry.get(k) for k in EXTRA_KEYS}
    return doc


def entry_path(entry: Mapping) -> str:
    """Where an entry goes under the export folder: {dataset}/{threat_model}/{name}_eps{eps}.json."""
    return (f"{safe_name(entry['dataset'])}/{safe_name(entry['threat_model'])}/"
            f"{safe_name(entry['name'])}_eps{safe_name(entry['eps'])}.json")


def write_robustbench(entries: Sequence[Mapping], out: str, endpoint_url: str | None = None) -> list[str]:
    """Write each entry as JSON under `out` (a folder or s3://...), atomically; returns the URIs."""
    store = Store(out, endpoint_url=endpoint_url)
    written = []
    for entry in entries:
        rel = entry_path(entry)
        store.write_json(rel, robustbench_json(entry))
        written.append(store.join(rel))
    return written
