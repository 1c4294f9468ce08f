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
    ``on_gap(topic, count)`` counts the missing records of each new hole.
    """

    seek: Callable[[str, int, int], Awaitable[object]]
    on_gap: Callable[[str, int], None] = lambda topic, count: None
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rewinding: dict[tuple[str, int], int] = field(default_factory=dict)

    async def admit(self, message: Any) -> bool:
        """Whether the agent may handle ``message`` (a Faust ``Message``) now."""
        key = (message.topic, message.partition)
        want = self.next_offsets.get(key)
        if want is not None and message.offset > want:
            if self.rewinding.get(key) != want:
                self.rewinding[key] = want
                self.on_gap(message.topic, message.offset - want)
                log.error("%s[%d]: offsets %d..%d never handed over; read again", *key, want, message.offset - 1)
                await self.seek(message.topic, message.partition, want)
            message.incref()  # never acked: its second reading is
            return False
        if want is None or message.offset >= want:
            self.next_offsets[key] = message.offset + 1
            self.rewinding.pop(key, None)
        return True

    def forget(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Partitions this agent no longer owns: their next owner reads on from the commits."""
        for key in partitions:
            self.next_offsets.pop(key, None)
            self.rewinding.pop(key, None)
