"""``ViewPusher``: the acks of held events wait for the changelog records their states went to."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from streams.pusher import FeatureRow, ViewPusher
from streams.windows import EntityState, WindowConfig, apply


class _Message:
    partition = 0
    timestamp = 0.0

    def incref(self, n: int = 1) -> None:
        pass


class _Event:
    def __init__(self) -> None:
        self.message = _Message()
        self.acked = 0

    def ack(self) -> bool:
        self.acked += 1
        return True


class _RefusingOnceTable:
    """Its first changelog record is refused by the broker (a failed delivery future)."""

    def __init__(self) -> None:
        self.saves = 0

    def get(self, key: str) -> EntityState | None:
        return None

    def put(self, key: str, state: EntityState) -> None:
        pass

    async def save(self, key: str, state: EntityState, partition: int) -> Any:
        self.saves += 1
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.saves == 1:
            delivered.set_exception(RuntimeError("MessageSizeTooLarge"))
        else:
            delivered.set_result(None)
        return delivered


class _Sink:
    def __init__(self) -> None:
        self.rows: list[FeatureRow] = []

    def warm_up(self) -> None:
        pass

    def push(self, view: str, rows: Sequence[FeatureRow]) -> None:
        self.rows.extend(rows)

    def store_epoch(self) -> str | None:
        return None


def test_an_event_is_acked_only_once_its_changelog_record_is_delivered() -> None:
    table, sink = _RefusingOnceTable(), _Sink()
    state = EntityState()
    apply(state, 1_000_000, "e1", "i1", WindowConfig.from_seconds(3600))

    async def main() -> _Event:
        pusher = ViewPusher(
            "user_activity",
            table,
            sink,
            lambda key, entity: FeatureRow(key, {}, entity.version_us),
            retry_max_s=0.1,
        )
        event = _Event()
        pusher.hold("u1", state, 0, event)
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)
        return event

    event = asyncio.run(main())
    # the refused record failed the first cycle: nothing acked then; the retry wrote it again
    assert (table.saves, event.acked) == (2, 1)
    assert [row.entity_id for row in sink.rows] == ["u1", "u1"]
