"""Items similar to an item: the model's ``similar`` signature, within a budget, or trending items.

The decision table (what ``SimilarItemsResponse`` and the metrics say):

=====================================  ==================  =========  ==================
situation                              items from          fallback   reason
=====================================  ==================  =========  ==================
the model knows the item               model (stable)      no         ""
the model does not know the item       trending            yes        item_unknown
model server down / past its budget    trending            yes        model_unavailable
model answers garbage or errors        trending            yes        model_error
no time left before the deadline       trending            yes        deadline
=====================================  ==================  =========  ==================

Always the ``stable`` label: similar items are not part of the A/B experiment (no user, no
impression), so they come from the version every user can see. "Does not know the item" is the
signature's contract: an item outside the catalog gets only padding (every id ""). The item itself
and the excluded ids are passed as ``exclude_items`` and filtered again here, from the model's
answer and the trending list alike, so neither is ever returned. The budget is the Recommend one
(``ranking.model_budget``): the model budget cut to the client's deadline less the reserve.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.api.metrics import ApiMetrics
from serving.api.ranking import (
    ModelAnswerError,
    NoAnswer,
    Predictor,
    TrendingSource,
    model_budget,
    parse_answer,
    rpc_fallback_reason,
)
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimilarAnswer:
    items: list[tuple[str, float]]
    model_version: int  # 0 when the items are trending items
    fallback_reason: str  # "" for the model's neighbours

    @property
    def fallback(self) -> bool:
        return bool(self.fallback_reason)


def similar_inputs(item_id: str, exclude: Sequence[str]) -> dict[str, np.ndarray]:
    """The ``similar`` signature's inputs for one item: ``item_id`` [1], ``exclude_items`` [1, max(1, E)]."""
    return {
        "item_id": np.array([item_id], dtype=object),
        "exclude_items": np.array([list(exclude) or [""]], dtype=object),
    }


def item_unknown(outputs: dict[str, np.ndarray]) -> bool:
    """The signature's "not in the catalog" answer: every returned id is padding ("")."""
    item_ids = outputs.get("item_ids")
    if item_ids is None:
        return False  # a malformed answer, which ``parse_answer`` reports
    return all(not (raw.decode() if isinstance(raw, bytes) else str(raw)) for raw in item_ids.reshape(-1))


class SimilarItems:
    """The model's neighbours of an item within budget, else trending (see the module docstring)."""

    def __init__(self, client: Predictor, trending: TrendingSource, metrics: ApiMetrics, *, budget_s: float) -> None:
        self._client = client
        self._trending = trending
        self._metrics = metrics
        self._budget_s = budget_s

    def similar(self, item_id: str, *, k: int, exclude: Sequence[str], deadline: float) -> SimilarAnswer:
        """``deadline`` is a ``time.monotonic()`` instant (the client's deadline)."""
        excluded = frozenset(exclude) | {item_id}
        try:
            version, outputs = self._client.predict(
                similar_inputs(item_id, exclude),
                signature=contracts.SIMILAR_SIGNATURE,
                label=contracts.STABLE_LABEL,
                timeout_s=model_budget(self._budget_s, deadline),
            )
            if item_unknown(outputs):
                return self._trending_answer(k=k, excluded=excluded, reason="item_unknown")
            items = parse_answer(outputs, k, excluded)
        except ModelServerRpcError as exc:
            return self._model_failed(ModelAnswerError(rpc_fallback_reason(exc), str(exc)), k=k, excluded=excluded)
        except ModelAnswerError as exc:
            return self._model_failed(exc, k=k, excluded=excluded)
        return SimilarAnswer(items, version, "")

    def _model_failed(self, error: ModelAnswerError, *, k: int, excluded: frozenset[str]) -> SimilarAnswer:
        self._metrics.degraded.labels("model_server").inc()
        log.debug("similar items fallback (%s): %s", error.reason, error)
        return self._trending_answer(k=k, excluded=excluded, reason=error.reason)

    def _trending_answer(self, *, k: int, excluded: frozenset[str], reason: str) -> SimilarAnswer:
        items = self._trending.snapshot.top(k, excluded)
        if not items:
            raise NoAnswer(
                f"the model could not answer ({reason}) and the trending list is empty; "
                "check the model server and the feature store's item stats (`streamrec features setup`)"
            )
        return SimilarAnswer(items, 0, reason)
