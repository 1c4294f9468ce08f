"""``streamrec.core.exploration``: the shown list, the propensities it logs, and a candidate's propensities for it."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from streamrec.core.exploration import Exploration, explore, propensity_of

RANKED = [(f"i{index}", 10.0 - index) for index in range(12)]  # best first; i5.. form the pool for k=5


def test_no_exploration_shows_the_ranked_list_with_propensity_one() -> None:
    shown = explore(RANKED, 5, Exploration(), random.Random(0))
    assert shown.items == RANKED[:5]
    assert shown.propensities == (1.0,) * 5 and shown.explored == (False,) * 5


@pytest.mark.parametrize("policy", ["epsilon_greedy", "softmax"])
def test_logged_propensities_match_how_often_the_policy_shows_each_item(policy: str) -> None:
    """Sampling over many requests: at each explorable position, the share of requests showing an
    item equals the propensity logged with it; the propensities a position can log sum to 1; the
    fixed positions never change."""
    exploration = Exploration(policy=policy, epsilon=0.3, slots=2, pool_size=4, temperature=1.0)  # type: ignore[arg-type]
    rng = random.Random(7)
    requests = 40_000
    seen: Counter[tuple[int, str]] = Counter()
    logged: dict[tuple[int, str], set[float]] = {}
    for _ in range(requests):
        shown = explore(RANKED, 5, exploration, rng)
        assert [item for item, _ in shown.items[:3]] == ["i0", "i1", "i2"]
        assert shown.propensities[:3] == (1.0, 1.0, 1.0)
        assert len({item for item, _ in shown.items}) == 5  # a drawn item is never shown twice
        for position in (3,):  # the first explorable position: its propensity does not depend on others
            item = shown.items[position][0]
            seen[(position, item)] += 1
            logged.setdefault((position, item), set()).add(shown.propensities[position])
        assert all(propensity > 0 for propensity in shown.propensities)
    first_position = {item: propensities for (position, item), propensities in logged.items() if position == 3}
    assert set(first_position) == {"i3", "i5", "i6", "i7", "i8"}
    assert all(len(values) == 1 for values in first_position.values())
    assert sum(next(iter(values)) for values in first_position.values()) == pytest.approx(1.0)
    for item, values in first_position.items():
        share = seen[(3, item)] / requests
        assert share == pytest.approx(next(iter(values)), abs=0.01), item
    assert next(iter(first_position["i3"])) == pytest.approx(0.7)


def test_softmax_draws_the_better_scored_pool_items_more_often() -> None:
    exploration = Exploration(policy="softmax", epsilon=1.0, slots=1, pool_size=4, temperature=0.5)
    shown = [explore(RANKED, 5, exploration, random.Random(seed)) for seed in range(2000)]
    counts = Counter(list_.items[4][0] for list_ in shown)
    assert counts["i5"] > counts["i6"] > counts["i7"] > counts["i8"] > 0


def test_the_second_explorable_position_conditions_on_the_first() -> None:
    """Propensities are conditional on the positions before: with both positions drawing, the
    second draws from the three items left, so its uniform share is 1/3."""
    exploration = Exploration(policy="epsilon_greedy", epsilon=1.0, slots=2, pool_size=4)
    shown = explore(RANKED, 5, exploration, random.Random(3))
    assert shown.explored == (False, False, False, True, True)
    assert shown.propensities[3:] == pytest.approx((1 / 4, 1 / 3))


def test_short_lists_and_an_empty_pool_show_what_there_is() -> None:
    exploration = Exploration(policy="epsilon_greedy", epsilon=0.5, slots=2, pool_size=4)
    assert explore(RANKED[:3], 5, exploration, random.Random(0)).propensities == (1.0, 1.0, 1.0)
    shown = explore(RANKED[:6], 5, exploration, random.Random(1))  # a pool of one item
    assert len(shown.items) == 5 and sum(shown.explored) <= 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"epsilon": 1.5}, "epsilon"), ({"slots": -1}, "slots"), ({"temperature": 0.0}, "temperature")],
)
def test_bad_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Exploration(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["none", "epsilon_greedy", "softmax"])
def test_a_policy_gives_its_own_lists_the_propensities_it_logged(policy: str) -> None:
    """``propensity_of`` recomputes, for the policy that showed a list, exactly what it logged; the
    probability of a list is then the product over its positions."""
    exploration = Exploration(policy=policy, epsilon=0.4, slots=2, pool_size=4)  # type: ignore[arg-type]
    rng = random.Random(11)
    for _ in range(200):
        shown = explore(RANKED, 5, exploration, rng)
        ids = [item for item, _ in shown.items]
        recomputed = tuple(propensity_of(RANKED, 5, exploration, ids, position) for position in range(5))
        assert recomputed == pytest.approx(shown.propensities)


def test_a_candidate_that_ranks_differently_gives_other_propensities_or_zero() -> None:
    exploration = Exploration(policy="epsilon_greedy", epsilon=0.2, slots=1, pool_size=2)
    logged = ["i0", "i1", "i2"]
    candidate = [("i0", 3.0), ("i2", 2.0), ("i1", 1.0), ("i3", 0.5), ("i4", 0.1)]  # swaps i1 and i2
    assert propensity_of(candidate, 3, exploration, logged, 0) == 1.0
    assert propensity_of(candidate, 3, exploration, logged, 1) == 0.0  # a fixed position it fills otherwise
    assert propensity_of(candidate, 3, exploration, logged, 2) == 0.0  # i2 is in its head, not its pool
    assert propensity_of(candidate, 3, exploration, ["i0", "i2", "i3"], 2) == pytest.approx(0.2 / 2)
    assert propensity_of(candidate, 3, exploration, ["i0", "i2", "i1"], 2) == pytest.approx(0.8)
