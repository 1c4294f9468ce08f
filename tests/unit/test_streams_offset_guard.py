"""``streams.offset_guard.OffsetGuard``: the joiner's agent reads each partition without a hole."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from streams.offset_guard import OffsetGuard


@dataclass
class _Message:
    partition: int
    offset: int
    topic: str = "impressions"
    refs: int = 0

    def incref(self) -> None:
        self.refs += 1


def test_a_hole_is_sought_once_and_the_records_past_it_wait_unacked() -> None:
    sought: list[tuple[str, int, int]] = []
    gaps: list[tuple[str, int]] = []

    async def seek(topic: str, partition: int, offset: int) -> None:
        sought.append((topic, partition, offset))

    guard = OffsetGuard(seek=seek, on_gap=lambda topic, count: gaps.append((topic, count)))

    async def admitted(partition: int, *offsets: int) -> list[int]:
        messages = [_Message(partition, offset) for offset in offsets]
        passed = [message.offset for message in messages if await guard.admit(message)]
        assert all(message.refs == (0 if message.offset in passed else 1) for message in messages)
        return passed

    async def main() -> None:
        assert await admitted(0, 4, 5) == [4, 5]  # the first record sets the start
        assert await admitted(0, 9, 10) == []  # 6..8 never came: sought back once
        assert await admitted(1, 0, 1) == [0, 1]  # other partitions are unaffected
        assert await admitted(0, 11) == []  # handed over before the seek: parked, no second seek
        assert sought == [("impressions", 0, 6)] and gaps == [("impressions", 3)]
        assert await admitted(0, 6, 7, 8, 9, 10, 11) == [6, 7, 8, 9, 10, 11]  # the re-read, in order
        assert await admitted(0, 5, 12) == [5, 12]  # an older offset (a duplicate) passes
        guard.forget({("impressions", 0)})
        assert await admitted(0, 40) == [40]  # back after a revoke: starts anew
        assert sought == [("impressions", 0, 6)]

    asyncio.run(main())


def test_a_hole_whose_first_record_does_not_come_is_sought_again() -> None:
    sought: list[int] = []
    now = [0.0]

    async def seek(topic: str, partition: int, offset: int) -> None:
        sought.append(offset)

    guard = OffsetGuard(seek=seek, clock=lambda: now[0])

    async def main() -> None:
        assert await guard.admit(_Message(0, 1))
        assert not await guard.admit(_Message(0, 4))  # 2, 3 missing
        await guard.retry()
        assert not await guard.admit(_Message(0, 5))
        assert sought == [2]  # not due yet
        now[0] += 6
        assert not await guard.admit(_Message(0, 6))  # a parked record: sought again
        now[0] += 6
        await guard.retry()  # no record at all: the timer seeks
        assert sought == [2, 2, 2]
        assert await guard.admit(_Message(0, 2))
        now[0] += 60
        await guard.retry()
        assert sought == [2, 2, 2] and guard.rewinding == {} and guard.sought_at == {}

    asyncio.run(main())
