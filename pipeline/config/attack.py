"""Attack tables, as a job file writes them, validated with pydantic.

    {"kind": "autoattack", "version": "rand", "norm": "Linf", "eps": 8/255}
    {"kind": "pgd", "preset": "lee-kim", "eps": 8/255}          # 200 steps, EOT 20, step 0.007
    {"kind": "pgd", "norm": "L2", "eps": 0.5, "steps": 100, "eot": 10, "loss": "dlr"}
    {"kind": "transfer", "surrogate": {"kind": "plain"}, "attack": {"kind": "pgd", "eps": 8/255}}
    {"kind": "none"}                                             # clean evaluation only

A transfer attack's eps and norm are its crafting attack's (`attack`): an eps or norm written on
the transfer table itself (as a job's eps sweep writes it) is moved into the crafting attack, and
one written in both places is refused.

Common fields: `passes` (R, the stochastic passes that score a randomized defense, default
10), `path` ("adaptive": the attacker sees the whole defense; "oblivious": it attacks the
defense's base classifier, MI only), `lm_gradient` ("bpda" or "exact": how gradients cross
RDC's likelihood maximization, overriding the defense's own setting), `selection_passes`
(S, the fresh passes that decide which candidate point to keep against a stochastic defense;
default R), `batched` (attack a unit's examples together, default true; false attacks one
example at a time), `converge` (rerun with doubled iterations and EOT until robust accuracy
moves by less than one example, at most `converge_cap` doublings, default 3).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, model_validator

from pipeline.config.tables import validate_table

AA_ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
KINDS = ("autoattack", "pgd", "transfer", "none")

FRACTION = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
FRACTION_FIELDS = ("eps", "step_size")
"""Budgets a job may write as the field writes them, an exact fraction of integers ("8/255")."""


def fraction(value):
    """A string "a/b" (integers, b > 0) as the float nearest a/b (float(Fraction(8, 255)) == 8 / 255,
    bit for bit); a string with a "/" that is no such fraction is refused; anything else is left
    for the field's own validation (and preflight's: a number written as a string is refused there)."""
    if isinstance(value, str) and "/" in value:
        found = FRACTION.match(value)
        if found is None:
            raise ValueError(f"expected a number or an exact fraction of integers such as \"8/255\", got {value!r}")
        if int(found.group(2)) == 0:
            raise ValueError(f"{value!r} divides by zero")
        return float(Fraction(int(found.group(1)), int(found.group(2))))
    return value


def exact_fractions(table):
    """An attack table (as written) with its fractions ("8/255", also in eps lists and a transfer's
    inner attack) turned into floats, so that every later reader (the plan, the hashes, the
    records) sees the number; strings that are no fraction are left for the validation to name."""
    if not isinstance(table, dict):
        return table
    out = dict(table)
    for key in FRACTION_FIELDS:
        value = out.get(key)
        if isinstance(value, list):
            out[key] = [_quiet(v) for v in value]
        else:
            out[key] = _quiet(value) if key in out else value
        if key not in table:
            out.pop(key, None)
    if isinstance(out.get("sweep"), dict):
        out["sweep"] = {k: [_quiet(v) for v in vs] if k in FRACTION_FIELDS and isinstance(vs, list) else vs
                        for k, vs in out["sweep"].items()}
    if isinstance(out.get("attack"), dict):
        out["attack"] = exact_fractions(out["attack"])
    return out


def _quiet(value):
    try:
        return fraction(value)
    except ValueError:
        return value


Budget = Annotated[float, BeforeValidator(fraction)]


class _Protocol(BaseModel):
    """How the protocol runs any attack: scoring passes, path, selection, batching, convergence."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    passes: int = Field(10, ge=1)
    path: Literal["adaptive", "oblivious"] = "adaptive"
    lm_gradient: Literal["bpda", "exact"] | None = None
    selection_passes: int | None = Field(None, ge=1)
    batched: bool = True
    converge: bool = False
    converge_cap: int = Field(3, ge=0)


class _Attack(_Protocol):
    norm: Literal["Linf", "L2", "L1"] = "Linf"
    eps: Budget = Field(8 / 255, ge=0)


class NoAttack(_Attack):
    kind: Literal["none"]
    eps: Budget = Field(0.0, ge=0)


class AutoAttackSpec(_Attack):
    kind: Literal["autoattack"]
    version: Literal["standard", "plus", "rand", "custom"] = "standard"
    attacks: list[Literal[AA_ATTACKS]] | None = None
    n_iter: int | None = Field(None, ge=1)
    restarts: int | None = Field(None, ge=1)
    eot_iter: int | None = Field(None, ge=1)
    square_queries: int | None = Field(None, ge=1)
    n_target_classes: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _custom_needs_attacks(self):
        if self.version == "custom" and not self.attacks:
            raise ValueError("version 'custom' needs a list of attacks")
        if self.version != "custom" and self.attacks:
            raise ValueError(f"attacks are only for version 'custom' (version is {self.version!r})")
        return self


class PGDSpec(_Attack):
    kind: Literal["pgd"]
    preset: Literal["lee-kim"] | None = None
    norm: Literal["Linf", "L2"] = "Linf"
    steps: int = Field(100, ge=1)
    step_size: Budget | None = Field(None, gt=0)
    eot: int = Field(1, ge=1)
    restarts: int = Field(1, ge=1)
    loss: Literal["ce", "dlr", "cw"] = "ce"
    random_start: bool = True

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        # Lee & Kim (ICCV 2023): 200 steps, EOT 20, step 0.007 at Linf 8/255; explicit fields win.
        if isinstance(data, dict) and data.get("preset") == "lee-kim":
            data = {"steps": 200, "eot": 20, "step_size": 0.007, **data}
        return data


CraftingSpec = Annotated[Union[AutoAttackSpec, PGDSpec], Field(discriminator="kind")]


class TransferSpec(_Protocol):
    """Craft on a surrogate, score on the defense. `attack` crafts the points: its eps and norm
    are the transfer's. `surrogate` is a defense table; it is parsed with the job
    (config/defense.py `surrogate_spec`), where it takes the attacked defense's dataset, data
    root and seed."""

    kind: Literal["transfer"]
    surrogate: dict
    attack: CraftingSpec

    @model_validator(mode="before")
    @classmethod
    def _budget_in_the_crafting_attack(cls, data):
        # A job's eps sweep writes eps on the outer table; the crafting attack is what uses it.
        if not isinstance(data, dict) or not isinstance(data.get("attack"), dict):
            return data
        moved = {k: data[k] for k in ("eps", "norm") if k in data}
        both = sorted(k for k in moved if k in data["attack"])
        if both:
            raise ValueError(f"{both[0]} is set twice, on the transfer ({moved[both[0]]!r}) and on its crafting attack "
                             f"({data['attack'][both[0]]!r}); set it once (a swept eps goes to the crafting attack)")
        if not moved:
            return data
        rest = {k: v for k, v in data.items() if k not in moved}
        return {**rest, "attack": {**data["attack"], **moved}}

    @property
    def eps(self) -> float:
        return self.attack.eps

    @property
    def norm(self) -> str:
        return self.attack.norm


AttackSpec = Annotated[Union[NoAttack, AutoAttackSpec, PGDSpec, TransferSpec], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(AttackSpec)


def parse_attack(config: dict):
    """Validate an attack table; ConfigError names every bad field."""
    return validate_table(_ADAPTER, config, "attack", KINDS)


def crafting(spec):
    """The attack that crafts the points: a transfer's crafting attack, else spec itself."""
    return spec.attack if spec.kind == "transfer" else spec


def attack_name(spec) -> str:
    """A short stable name: the spec's `name`, else kind and version/preset."""
    if spec.name:
        return spec.name
    if spec.kind == "autoattack":
        return f"aa-{spec.version}" if spec.version != "custom" else "aa-" + "+".join(spec.attacks)
    if spec.kind == "pgd":
        return "pgd-" + (spec.preset or (f"eot{spec.eot}" if spec.eot > 1 else spec.loss))
    if spec.kind == "transfer":
        return "transfer-" + attack_name(crafting(spec))
    return "clean"
