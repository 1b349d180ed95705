"""The fixed Arrow schema of one result record: one row per (example, defense, attack, eps).

`COLUMNS` is the single source of truth (name, type, meaning); `RECORD_SCHEMA` is built from it
so the docs' table (docs/results.md) and the Parquet files can never disagree. Every column is required
(non-null) except `broken_by` and `attack_success`, which are null when no attack ran or when
the attack does not report them, and the later additions in `OPTIONAL`, which a record may omit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pyarrow as pa

from pipeline.errors import StoreError

# (name, type, meaning). Types use the short names of `_TYPES`; "?" marks a nullable column.
COLUMNS: list[tuple[str, str, str]] = [
    ("run_id", "string", "Run the record belongs to (one job execution; the output folder name)."),
    ("job_hash", "string", "Hash of the job the run executes (plan.json's job_hash); rows of two jobs are never pooled under one label."),
    ("unit_id", "string", "Content hash of the unit (defense, attack, eps, example shard) that produced the row."),
    ("example_id", "int64", "Index of the example in its dataset split."),
    ("label", "int64", "True class of the example."),
    ("defense", "string", "Defense name (e.g. plain-erm, mi-pl, rdc-optimal-lm)."),
    ("attack", "string", "Attack name (e.g. aa-standard, aa-rand, pgd-lee-kim, transfer-pgd-ce, clean)."),
    ("path", "string", "What the attacker differentiated: adaptive, adaptive+bpda / adaptive+exact (through LM), oblivious (MI's base classifier), transfer:SURROGATE."),
    ("norm", "string", "Threat model: Linf, L2 or L1."),
    ("eps", "float64", "Perturbation budget in the norm above, pixel scale [0, 1] (0 for no attack)."),
    ("seed", "int64", "Job seed; every draw is a function of (seed, example id, index)."),
    ("passes", "int64", "R: stochastic forward passes of the defense per input (1 if deterministic)."),
    ("clean_pred", "int64", "Prediction on the clean input, first pass."),
    ("clean_correct", "bool", "clean_pred == label."),
    ("clean_vote_pred", "int64", "Majority vote over the R passes on the clean input."),
    ("clean_vote_correct", "bool", "clean_vote_pred == label."),
    ("clean_worst_correct", "bool", "All R clean passes correct."),
    ("clean_pass_accuracy", "float64", "Fraction of the R clean passes that are correct, in [0, 1]."),
    ("adv_pred", "int64", "Prediction on the adversarial input, first pass."),
    ("adv_correct", "bool", "adv_pred == label (robust accuracy is its mean)."),
    ("adv_vote_pred", "int64", "Majority vote over the R passes on the adversarial input."),
    ("adv_vote_correct", "bool", "adv_vote_pred == label."),
    ("adv_worst_correct", "bool", "All R adversarial passes correct."),
    ("adv_pass_accuracy", "float64", "Fraction of the R adversarial passes that are correct, in [0, 1]."),
    ("clean_logits", "list<float32>", "Logits (K,) of the first clean pass."),
    ("adv_logits", "list<float32>", "Logits (K,) of the first adversarial pass."),
    ("linf", "float64", "L-infinity norm of the perturbation, pixel scale."),
    ("l2", "float64", "L2 norm of the perturbation over all C*H*W values."),
    ("l1", "float64", "L1 norm of the perturbation over all C*H*W values."),
    ("broken_by", "string?", "Stage that first fooled the attacker's own check (apgd-ce, apgd-t, fab-t, square, pgd) or clean (already wrong); null if none."),
    ("attack_success", "bool?", "Whether the attack reports success; null if it does not say."),
    ("queries", "int64", "Model queries the attack made for this example."),
    ("gradients", "int64", "Input gradients the attack computed for this example."),
    ("forward_passes", "int64", "Network evaluations (images through a UNet or classifier) in forward, attack plus scoring."),
    ("backward_passes", "int64", "Network evaluations backpropagated (input gradients), attack only."),
    ("seconds", "float64", "Wall-clock seconds of this example's attack plus its share of the batched scoring."),
    ("worker", "string", "Worker (actor / host) that ran the unit."),
    ("device", "string", "Torch device the unit ran on (cpu, cuda)."),
    ("config_hash", "string", "Hash of the unit's defense table (models are cached by it)."),
    ("flags", "list<string>", "Sanity flags: zero_gradient, nan_gradient, stochastic_without_eot, square_beat_whitebox, returned_clean, single_pass_optimistic, budget_not_converged; sorted, unique."),
    ("iterations", "int64?", "Attack iterations per run (PGD steps, APGD/FAB iterations) actually used, after any convergence doubling; null in records written before it existed."),
    ("eot", "int64?", "EOT draws per gradient actually used; null in records written before it existed."),
]

OPTIONAL = frozenset({"iterations", "eot"})
"""Columns added after the first release: a record may leave them out (they are then null)."""

_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<float32>": pa.list_(pa.float32()),
    "list<string>": pa.list_(pa.string()),
}


def _field(name: str, type_name: str) -> pa.Field:
    nullable = type_name.endswith("?")
    return pa.field(name, _TYPES[type_name.rstrip("?")], nullable=nullable)


RECORD_SCHEMA: pa.Schema = pa.schema([_field(name, type_name) for name, type_name, _ in COLUMNS])
"""Arrow schema of a records table / Parquet file, in column order of `COLUMNS`."""


def schema_fingerprint(schema: pa.Schema) -> str:
    """A short hash of a schema's names, types and nullability (not its metadata): the footer
    key `robustsweep.schema`, so a file written under another schema is known before it is read."""
    text = ";".join(f"{f.name}:{_type_key(f.type)}{'' if f.nullable else '!'}" for f in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _type_key(t: pa.DataType) -> str:
    # Parquet names a list's child "element" where Arrow says "item": the same column either way.
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_key(t.value_type)}>"
    return str(t)


RECORD_FINGERPRINT = schema_fingerprint(RECORD_SCHEMA)

_NAMES = tuple(RECORD_SCHEMA.names)


def records_to_table(records: Sequence[Mapping], **constant_columns) -> pa.Table:
    """A table with `RECORD_SCHEMA` from record dicts (one per row).

    records: dicts as made by `pipeline.protocol.evaluate` (every column except the constants).
    constant_columns: columns with one value for every row (run_id, unit_id, worker,
        config_hash, ...). A column given both ways must hold the same value in every record.
    Raises StoreError naming the field when a field is missing, unknown, null where the schema
    forbids it, or of a type that does not convert.
    """
    unknown = sorted(set(constant_columns) - set(_NAMES))
    if unknown:
        raise StoreError(f"unknown record field(s) {unknown} given as constant columns; "
                         f"the record schema has {list(_NAMES)}")
    expected = set(_NAMES) - set(constant_columns)
    columns: dict[str, list] = {name: [] for name in expected}
    for i, rec in enumerate(records):
        keys = set(rec) | (OPTIONAL & expected)
        if keys != expected:
            _raise_key_mismatch(i, keys, expected, constant_columns, rec)
        for name in expected:
            columns[name].append(rec.get(name))
    n = len(records)
    arrays = []
    for field in RECORD_SCHEMA:
        name = field.name
        values = columns[name] if name in columns else [constant_columns[name]] * n
        if not field.nullable and any(v is None for v in values):
            row = next(i for i, v in enumerate(values) if v is None)
            raise StoreError(f"record field {name!r} is null in row {row}; it is required ({field.type})")
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as exc:
            raise StoreError(f"record field {name!r} does not convert to {field.type}: "
                             f"{type(exc).__name__}: {exc}") from None
    return pa.Table.from_arrays(arrays, schema=RECORD_SCHEMA)


def _raise_key_mismatch(i: int, keys: set, expected: set, constants: Mapping, rec: Mapping) -> None:
    # A key present both in a record and as a constant is tolerated only when the values agree:
    # evaluate() records `device`, and a caller may also pass it as a constant.
    both = keys & set(constants)
    for name in sorted(both):
        if rec[name] != constants[name]:
            raise StoreError(f"record field {name!r} is {rec[name]!r} in row {i} but "
                             f"{constants[name]!r} as a constant column")
    keys = keys - both
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing:
        raise StoreError(f"record {i} is missing field(s) {missing}")
    if extra:
        raise StoreError(f"record {i} has unknown field(s) {extra}; the record schema has {list(_NAMES)}")
