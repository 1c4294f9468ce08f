"""An agent's check that it is handed each partition's records without a hole (the joiner's).

Faust can read records and never hand them to an agent: around a rebalance it clears its stream
queues, and for a partition with no committed offset yet its seek back is a no-op, so nothing
reads them again (docs/design/streams.md#offset-gaps). The consumer
(``streams.faust_app.GaplessConsumer``) never commits over them; this guard has them read again.
The feature worker checks the same in ``FeaturePipeline._check_offsets``, with batches, parking
and the first record of an assigned partition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class OffsetGuard:
    """Per (topic, partition), the offset the agent expects next.

    A record past it means records were never handed over: the partition is sought back
    (``seek(topic, partition, offset)``) to the first missing offset, once per hole, and each
    record past the hole is kept unacked (so no commit covers it) and skipped: it is handed over
    again behind the re-read. Earlier offsets (duplicates after a seek back) pass.
    ``on_gap(topic, count)`` counts the missing records of each new hole. A hole whose first
    record has not come ``retry_s`` after the last seek is sought again (:meth:`retry`, also on a
    timer), as the feature worker does.
    """

    seek: Callable[[str, int, int], Awaitable[object]]
    on_gap: Callable[[str, int], None] = lambda topic, count: None
    retry_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rewinding: dict[tuple[str, int], int] = field(default_factory=dict)
    sought_at: dict[tuple[str, int], float] = field(default_factory=dict)

    async def admit(self, message: Any) -> bool:
        """Whether the agent may handle ``message`` (a Faust ``Message``) now."""
        key = (message.topic, message.partition)
        want = self.next_offsets.get(key)
        if want is not None and message.offset > want:
            if self.rewinding.get(key) != want:
                self.rewinding[key] = want
                self.on_gap(message.topic, message.offset - want)
                log.error("%s[%d]: offsets %d..%d never handed over; read again", *key, want, message.offset - 1)
                await self._seek(key, want)
            else:
                await self.retry()
            message.incref()  # never acked: its second reading is
            return False
        if want is None or message.offset >= want:
            self.next_offsets[key] = message.offset + 1
            self.rewinding.pop(key, None)
            self.sought_at.pop(key, None)
        return True

    async def retry(self) -> None:
        """Seek again each hole whose first record has not come ``retry_s`` after the last seek."""
        due_before = self.clock() - self.retry_s
        for key, want in list(self.rewinding.items()):
            if self.sought_at.get(key, 0.0) < due_before:
                log.warning("%s[%d]: offset %d has not come back; seeking there again", *key, want)
                await self._seek(key, want)

    async def _seek(self, key: tuple[str, int], offset: int) -> None:
        self.sought_at[key] = self.clock()
        await self.seek(key[0], key[1], offset)

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions this agent no longer owns: their next owner reads on from the commits."""
        for key in partitions:
            self.next_offsets.pop(key, None)
            self.rewinding.pop(key, None)
            self.sought_at.pop(key, None)
