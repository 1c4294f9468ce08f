"""Exploration over the ranked candidates, with each shown item's probability under the policy.

A list of ``k`` items keeps its first ``k - slots`` items as ranked. Each of the last ``slots``
positions (the exploration budget, e.g. 1-2) shows, with probability ``epsilon``, an item drawn
from the *pool* (the candidates ranked just below the list) instead of its ranked item:
uniformly (``epsilon_greedy``) or by a softmax over the pool's scores (``softmax``). Items drawn
for earlier slots leave the pool.

Each shown item carries its *propensity*: the probability that the policy shows that item at
that position, given what the positions before it show. A fixed position's item has 1; an
explorable position's ranked item ``1 - epsilon`` (it is not in the pool); a drawn item
``epsilon * q`` with ``q`` its share of the remaining pool. Over every item a position could
show, the propensities sum to 1, and the product over a list is the list's probability. The
joiner carries them to the labeled examples, where off-policy estimates (``streamrec.core.ope``)
weigh a candidate's choices by them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

ExplorationPolicy = Literal["none", "epsilon_greedy", "softmax"]


@dataclass(frozen=True)
class Exploration:
    """The serving policy's exploration: ``policy``, the chance ``epsilon`` that an explorable
    position shows a drawn item, the number of explorable ``slots`` (the last ones), the
    ``pool_size`` (candidates below the list that may be drawn) and the softmax ``temperature``."""

    policy: ExplorationPolicy = "none"
    epsilon: float = 0.1
    slots: int = 1
    pool_size: int = 20
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"exploration epsilon {self.epsilon} must lie in [0, 1]")
        if self.slots < 0 or self.pool_size < 0:
            raise ValueError("exploration slots and pool_size must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"exploration temperature {self.temperature} must be > 0")

    @property
    def candidates_wanted(self) -> int:
        """How many candidates beyond the list the ranker should keep for the pool."""
        return 0 if self.policy == "none" else self.pool_size


@dataclass(frozen=True)
class Shown:
    """What a list shows: (item, score) pairs, each one's propensity, and which were drawn."""

    items: list[tuple[str, float]]
    propensities: tuple[float, ...]
    explored: tuple[bool, ...]


def explore(ranked: Sequence[tuple[str, float]], k: int, exploration: Exploration, rng: random.Random) -> Shown:
    """The list of at most ``k`` items shown for ``ranked`` (best first, the pool after the first
    ``k``) under ``exploration``; ``rng`` draws (one per request, seedable in tests)."""
    head = list(ranked[:k])
    pool = list(ranked[k : k + exploration.pool_size])
    propensities = [1.0] * len(head)
    explored = [False] * len(head)
    if exploration.policy == "none" or exploration.epsilon == 0 or not pool:
        return Shown(head, tuple(propensities), tuple(explored))
    first = max(0, len(head) - exploration.slots)
    for position in range(first, len(head)):
        if not pool:
            break  # nothing left to draw: this position shows its ranked item for sure
        shares = _shares(pool, exploration)
        if rng.random() < exploration.epsilon:
            index = _draw(shares, rng)
            head[position] = pool.pop(index)
            propensities[position] = exploration.epsilon * shares[index]
            explored[position] = True
        else:
            propensities[position] = 1.0 - exploration.epsilon
    return Shown(head, tuple(propensities), tuple(explored))


def propensity_of(
    ranked: Sequence[tuple[str, float]],
    k: int,
    exploration: Exploration,
    shown: Sequence[str],
    position: int,
) -> float:
    """The probability that a policy ranking ``ranked`` (best first, with its pool below the
    first ``k``) under ``exploration`` shows ``shown[position]`` at ``position``, given that the
    positions before it show ``shown[:position]`` (how a logged list is weighed for a candidate
    policy: the candidate's ``ranked``, the logged ``shown``). 0 where it could not."""
    item = shown[position]
    head = [candidate for candidate, _ in ranked[:k]]
    if position >= len(head):
        return 0.0
    first = max(0, len(head) - exploration.slots) if exploration.policy != "none" else len(head)
    if position < first or exploration.epsilon == 0:
        return 1.0 if head[position] == item else 0.0
    earlier = set(shown[:position])
    below = ranked[k : k + exploration.pool_size]
    pool = [(candidate, score) for candidate, score in below if candidate not in earlier]
    if not pool:
        return 1.0 if head[position] == item else 0.0
    if head[position] == item:
        return 1.0 - exploration.epsilon
    shares = dict(zip((candidate for candidate, _ in pool), _shares(pool, exploration), strict=True))
    return exploration.epsilon * shares.get(item, 0.0)


def _shares(pool: Sequence[tuple[str, float]], exploration: Exploration) -> list[float]:
    if exploration.policy == "epsilon_greedy":
        return [1.0 / len(pool)] * len(pool)
    top = max(score for _, score in pool)
    weights = [math.exp((score - top) / exploration.temperature) for _, score in pool]
    total = sum(weights)
    return [weight / total for weight in weights]


def _draw(shares: Sequence[float], rng: random.Random) -> int:
    point, cumulative = rng.random(), 0.0
    for index, share in enumerate(shares):
        cumulative += share
        if point < cumulative:
            return index
    return len(shares) - 1
