"""RobustBench-style model cards: one JSON per defense, threat model and budget.

The fields follow RobustBench's `model_info/{dataset}/{threat_model}/{model}.json` entries
(accuracies as percent strings with two decimals, eps as written in papers, e.g. "8/255"),
plus what a sweep knows beyond them:

    name, dataset, threat_model, eps, clean_acc, autoattack_acc, number_forward_passes,
    n_examples, additional_data, architecture, link, authors, venue, reported, footnote,
    robust_acc_all_attacks, attacks, autoattack_attacks, defense_table

- architecture and additional_data describe the defense's model as the run's plan.json records
  it (`models`, written by runtime/run.py from each checkpoint's config.json); null or
  "unknown model" where the plan does not say.

- The entry covers the examples AutoAttack ran on at that budget (all attacked examples when
  it did not run); n_examples counts them.
- autoattack_acc: the share of them that every AutoAttack run at that budget left correctly
  classified (an example broken by any AutoAttack version counts as broken); null when no
  AutoAttack ran on the defense at that budget.
- robust_acc_all_attacks: the same over every attack run at that budget (PGD, transfer, ...).
- clean_acc: the share of them classified correctly without attack (every record of the
  example must say so; the first of the R passes, as AutoAttack scores).
- number_forward_passes: network evaluations per prediction of the defense, measured on the
  scoring passes and kept in the footer of the run's adversarial-images files
  (pipeline.store.adversarial); null for runs without them.

Which attacks are AutoAttack comes from the run's plan.json (attack kind "autoattack"), else
from the default attack name prefix "aa-".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline.analytics.render import format_eps
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


def robustbench_entries(source: Source, *, plans: Sequence[Mapping] = (), runs: Sequence[tuple] = ()) -> list[dict]:
    """One RobustBench-style entry per (defense, norm, eps > 0); see the module docstring."""
    kinds = attack_kinds(plans)
    tables = defense_tables(plans)
    cards = model_cards(plans)
    dataset = next((p["job"]["data"]["dataset"] for p in plans if "job" in p), "unknown")
    passes = forward_passes(runs)
    con, owned = as_connection(source)
    try:
        names = [r[0] for r in con.execute("SELECT DISTINCT attack FROM results").fetchall()]
        aa = [a for a in names if (kinds.get(a) == "autoattack" if a in kinds else a.startswith("aa-"))]
        # Per example first (an example counts as robust only if every attack left it right),
        # then per (defense, norm, eps); when AutoAttack ran, the entry covers its examples.
        found = con.execute("""
            WITH per AS (
                SELECT defense, norm, eps, example_id, bool_and(clean_correct) AS clean,
                       bool_and(adv_correct) AS all_ok,
                       bool_and(adv_correct) FILTER (WHERE list_contains($aa, attack)) AS aa_ok,
                       max(passes) AS r
                FROM results WHERE eps > 0 GROUP BY ALL)
            SELECT defense, norm, eps, count(*), count_if(clean), count_if(all_ok), count(aa_ok),
                   count_if(aa_ok AND clean IS NOT NULL), count_if(clean AND aa_ok IS NOT NULL),
                   count_if(all_ok AND aa_ok IS NOT NULL), max(r)
            FROM per GROUP BY ALL ORDER BY ALL
        """, {"aa": aa}).fetchall()
        attacks = {(d, n, e): a for d, n, e, a in con.execute(
            "SELECT defense, norm, eps, list_sort(list_distinct(list(attack))) FROM results WHERE eps > 0 GROUP BY ALL"
        ).fetchall()}
    finally:
        if owned:
            con.close()
    entries = []
    for defense, norm, eps, n, clean_k, all_k, n_aa, aa_k, clean_aa_k, all_aa_k, r in found:
        used = attacks[(defense, norm, eps)]
        base, clean, robust_all = (n_aa, clean_aa_k, all_aa_k) if n_aa else (n, clean_k, all_k)
        table, card = tables.get(defense, {}), cards.get(defense, {})
        footnote = f"robustsweep: attacks {', '.join(used)}"
        if r > 1:
            footnote += f"; R = {r} scoring passes, accuracy of the first pass"
        entries.append({
            "name": defense, "dataset": dataset, "threat_model": norm, "eps": format_eps(eps, norm),
            "clean_acc": _pct(clean, base), "autoattack_acc": _pct(aa_k, n_aa) if n_aa else None,
            "number_forward_passes": passes.get(defense), "n_examples": int(base),
            "additional_data": card.get("additional_data"), "architecture": architecture(table, card),
            "link": "", "authors": "", "venue": "", "reported": "", "footnote": footnote,
            "robust_acc_all_attacks": _pct(robust_all, base),
            "attacks": list(used), "autoattack_attacks": [a for a in used if a in aa],
            "defense_table": table, "eps_value": eps,
        })
    return entries


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
        store.write_json(rel, dict(entry))
        written.append(store.join(rel))
    return written
