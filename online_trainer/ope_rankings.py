"""A two-tower model's ranking of logged lists' user inputs, as the API would have asked it.

The API asks ``recommend`` with the user inputs it logged and excludes the user's recent items
(the request default); the off-policy gate (:mod:`online_trainer.ope_gate`) needs the same
ranking from a candidate, including the pool below the list that exploration draws from.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from online_trainer.inference import recommend
from online_trainer.model import TwoTowerModel
from online_trainer.ope_gate import LoggedList, RankLists


def two_tower_rankings(model: TwoTowerModel) -> RankLists:
    """A ``RankLists`` for ``model``: (item, score) best first, at most ``depth``, padding dropped."""

    def rank(lists: Sequence[LoggedList], depth: int) -> list[list[tuple[str, float]]]:
        if not lists:
            return []
        frame = pd.DataFrame([{**logged.features, "user_id": logged.user_id} for logged in lists])
        exclude = [[str(item) for item in logged.features.get("recent_items") or []] for logged in lists]
        ids, scores = recommend(model, frame, k=depth, exclude=exclude)
        return [
            [(str(item), float(score)) for item, score in zip(row_ids, row_scores, strict=True) if item]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    return rank
