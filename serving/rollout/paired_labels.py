"""The experiment's arms span two models when the ranking stage is on: move their labels together.

The canary arm is the retrieval model's ``canary`` version ordered by the ranking model's
``canary`` version (the trainer publishes a ranking canary only with a retrieval canary), so a
decision on the arm moves both: promote sets each model's ``stable`` to its ``canary``, rollback
each ``canary`` to its ``stable``. The retrieval model's labels are the experiment's (what the
evaluator reads and records); the ranking model follows. A ranking model that has no canary of
its own, or is not on the server yet, is left as it is, and a failure to move it is logged, not
raised: the retrieval decision has been applied and the decision log must say so.
"""

from __future__ import annotations

import logging
from typing import Protocol

from streamrec.core import contracts
from streamrec.core.errors import StreamrecError

log = logging.getLogger(__name__)


class Labels(Protocol):
    def labels(self) -> dict[str, int]: ...

    def promote(self, version: int | None = None) -> int: ...

    def rollback(self, version: int | None = None) -> int: ...


class PairedLabels:
    """A ``LabelController`` over the retrieval model's labels that moves the ranking model's too."""

    def __init__(self, retrieval: Labels, ranking: Labels) -> None:
        self.retrieval = retrieval
        self.ranking = ranking

    def labels(self) -> dict[str, int]:
        return self.retrieval.labels()

    def promote(self, version: int | None = None) -> int:
        promoted = self.retrieval.promote(version)
        self._follow("promote")
        return promoted

    def rollback(self, version: int | None = None) -> int:
        """Roll both back; with ``version``, only while it is still the retrieval canary (a newer
        canary, published meanwhile, was not judged: neither model moves)."""
        rolled_back = self.retrieval.rollback(version)  # a compare-and-set on the canary
        if version is not None and self.retrieval.labels().get(contracts.CANARY_LABEL) not in (None, rolled_back):
            log.info("rollback of version %d: the canary moved on, no label moves", version)
            return rolled_back
        self._follow("rollback")
        return rolled_back

    def _follow(self, action: str) -> None:
        try:
            labels = self.ranking.labels()
            canary, stable = labels.get(contracts.CANARY_LABEL), labels.get(contracts.STABLE_LABEL)
            if canary is None or canary == stable:
                return
            if action == "promote":
                self.ranking.promote(canary)
            else:
                self.ranking.rollback()
            log.info("ranking model: %s of version %d (stable was %s)", action, canary, stable)
        except (StreamrecError, OSError) as exc:
            log.error("the ranking model's labels did not follow the %s: %s", action, exc)
