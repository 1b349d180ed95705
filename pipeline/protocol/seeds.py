"""The seeds of an evaluation: every draw of an attack or a scoring pass is a pure function of
the job's seed and the example ids, so a record never depends on batching, order or retries."""

from __future__ import annotations

from pipeline import rng

SELECT = 0x5E1EC7  # the tag of the selection passes' seeds, apart from the scoring passes'


def pass_seed(seed: int, r: int) -> int:
    """The seed of scoring pass r: fresh draws, the same for clean and adversarial inputs."""
    return rng.seed_of(seed, rng.SCORE, r)


def example_seed(seed: int, example_id: int) -> int:
    """The seed of one example's attack in per-example mode."""
    return rng.seed_of(seed, rng.ATTACK, example_id)


def unit_seed(seed: int, example_ids) -> int:
    """The seed of a batched attack on the examples `example_ids` (in their order)."""
    h = rng.seed_of(seed, rng.ATTACK, len(example_ids))
    for i in example_ids:
        h = rng.seed_of(h, int(i))
    return h
