"""build_attack: a parsed attack spec (pipeline.config.attack) -> an Attack (pipeline.attacks), as
build_defense turns a defense spec into a module. It sits in the protocol, the layer that knows
both the specs and the attacks; the attacks themselves know neither parsing nor defenses."""

from __future__ import annotations

from pipeline.attacks import PGD, Attack, AutoAttack, Clean, Transfer
from pipeline.config.attack import AutoAttackSpec, NoAttack, PGDSpec, TransferSpec, attack_name
from pipeline.defenses.base import Defense
from pipeline.errors import ConfigError


def build_attack(spec, num_classes: int, *, surrogate: Defense | None = None, name: str | None = None) -> Attack:
    """The attack of a parsed spec against a `num_classes`-class defense.

    surrogate: a transfer attack's crafting model (built with build_defense from
    pipeline.config.defense.surrogate_spec); only a transfer takes one. name: its name in
    records, as the job planned it (with any sweep suffix); default: the spec's.
    """
    if isinstance(spec, dict):
        raise ConfigError("build_attack takes a parsed spec; parse a table with pipeline.config.spec(table)")
    if isinstance(spec, TransferSpec) != (surrogate is not None):
        raise ConfigError("a transfer attack needs its surrogate: pass surrogate=, a defense built from the spec's "
                          "`surrogate` table (pipeline.config.defense.surrogate_spec)" if surrogate is None else
                          f"surrogate: only a transfer attack takes one, not {spec.kind!r}")
    name = name or attack_name(spec)
    if isinstance(spec, TransferSpec):
        return Transfer(spec, build_attack(spec.attack, num_classes), surrogate, name)
    if isinstance(spec, PGDSpec):
        return PGD(spec, name)
    if isinstance(spec, AutoAttackSpec):
        return AutoAttack(spec, num_classes, name)
    if isinstance(spec, NoAttack):
        return Clean(spec, name)
    raise ConfigError(f"build_attack: {type(spec).__name__} is not an attack spec")
