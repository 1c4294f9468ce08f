"""Team-draft interleaving: one list that shows both models' choices, each item credited to one.

Why: arms are per user, users differ far more than two close model versions do, and a user
sends many requests in a row, so an A/B comparison of per-arm CTR needs thousands of users to
see a lift of a few percent (``serving/rollout/sequential.py``). Interleaving compares the two models
*inside each request*, on the same user at the same moment, which removes the between-user noise;
it is known to need one to two orders of magnitude fewer requests than an A/B test for the same
verdict (Radlinski, Kurup & Joachims, "How does clickthrough data reflect retrieval quality?",
CIKM 2008; Chapelle et al., "Large-scale validation and analysis of interleaved search
evaluation", TOIS 2012).

Team draft (Radlinski et al. 2008): like captains picking players, in each round a fresh coin
decides which team picks first; each team then adds its highest-ranked item not already in the
list. Every shown item belongs to exactly one team, and a click is credit for that team. Under no
difference between the models each click's team is a fair coin, whatever the user, which is what
makes the evaluator's test on the share of credited clicks valid (``serving/rollout/policy.py``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from streamrec.core import contracts
from streamrec.core.events import Arm

Ranking = Sequence[tuple[str, float]]


def team_draft(
    canary: Ranking, stable: Ranking, k: int, rng: random.Random | None = None
) -> list[tuple[str, float, Arm]]:
    """Up to ``k`` ``(item, score, team)`` from the two rankings (best first), no item twice.

    A team that runs out of items stops picking and the other fills the rest; the score shown is
    the picking team's own. ``rng`` is for tests; the default is a fresh coin per call.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    coin = rng or random
    teams: dict[Arm, Ranking] = {contracts.CANARY_LABEL: canary, contracts.STABLE_LABEL: stable}
    cursor: dict[Arm, int] = {contracts.CANARY_LABEL: 0, contracts.STABLE_LABEL: 0}
    picked: dict[Arm, int] = {contracts.CANARY_LABEL: 0, contracts.STABLE_LABEL: 0}
    shown: list[tuple[str, float, Arm]] = []
    taken: set[str] = set()

    def next_item(team: Arm) -> tuple[str, float] | None:
        ranking = teams[team]
        while cursor[team] < len(ranking):
            item_id, score = ranking[cursor[team]]
            cursor[team] += 1
            if item_id not in taken:
                return item_id, score
        return None

    exhausted: set[Arm] = set()
    while len(shown) < k and len(exhausted) < 2:
        canary_first = picked[contracts.CANARY_LABEL] < picked[contracts.STABLE_LABEL] or (
            picked[contracts.CANARY_LABEL] == picked[contracts.STABLE_LABEL] and coin.random() < 0.5
        )
        order: tuple[Arm, Arm] = (
            (contracts.CANARY_LABEL, contracts.STABLE_LABEL)
            if canary_first
            else (contracts.STABLE_LABEL, contracts.CANARY_LABEL)
        )
        team = next(candidate for candidate in order if candidate not in exhausted)
        choice = next_item(team)
        if choice is None:
            exhausted.add(team)
            picked[team] = 1 << 30  # never "behind" again: the other team fills the list
            continue
        taken.add(choice[0])
        picked[team] += 1
        shown.append((choice[0], choice[1], team))
    return shown
