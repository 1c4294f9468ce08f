"""``ViewPusher``: the acks of held events wait for the changelog records their states went to."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Sequence
from typing import Any

import pytest

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


def _one_event_state() -> EntityState:
    """An entity state holding one event (what every pusher test writes)."""
    state = EntityState()
    apply(state, 1_000_000, "e1", "i1", WindowConfig.from_seconds(3600))
    return state


def _pusher(table: Any, sink: Any, view: str = "user_activity", **options: Any) -> ViewPusher:
    """A pusher of ``view`` whose rows carry only the state's version."""
    return ViewPusher(view, table, sink, lambda key, entity: FeatureRow(key, {}, entity.version_us), **options)


def test_an_event_is_acked_only_once_its_changelog_record_is_delivered() -> None:
    table, sink = _RefusingOnceTable(), _Sink()
    state = _one_event_state()

    async def main() -> _Event:
        pusher = _pusher(table, sink, retry_max_s=0.1)
        event = _Event()
        pusher.hold("u1", state, 0, event)
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)
        return event

    event = asyncio.run(main())
    # the refused record failed the first cycle: nothing acked then; the retry wrote it again
    assert (table.saves, event.acked) == (2, 1)
    assert [row.entity_id for row in sink.rows] == ["u1", "u1"]


class _RecordingTable(_RefusingOnceTable):
    """Records every changelog record (key, partition); all delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, int]] = []

    async def save(self, key: str, state: EntityState, partition: int) -> Any:
        self.records.append((key, partition))
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered


class _SlowSink(_Sink):
    """A push that takes ``delay_s`` (an online store coming back), so a fence lands during it."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def push(self, view: str, rows: Sequence[FeatureRow]) -> None:
        time.sleep(self.delay_s)
        super().push(view, rows)


def _event_of(partition: int) -> _Event:
    event = _Event()
    event.message = _Message()
    event.message.partition = partition
    return event


def test_a_fenced_partition_gets_no_changelog_record_and_no_ack_until_it_is_assigned_again() -> None:
    """``ViewPusher.fence`` (a revoke still waiting at its fence time): the cycle in flight acks nothing
    and writes no further record; the fenced partition's held and new events are never acked and
    its entities never written (their next owner reads them again); another partition's entities
    go back for the next cycle; ``unfence`` lets writes resume."""
    table, sink = _RecordingTable(), _SlowSink(delay_s=0.3)
    state = _one_event_state()

    async def main() -> None:
        pusher = _pusher(table, sink, "item_stats")
        in_flight = [_event_of(1), _event_of(2)]
        pusher.hold("a", state, 1, in_flight[0])
        pusher.hold("b", state, 2, in_flight[1])
        await pusher.kick()
        await asyncio.sleep(0.1)  # the cycle is in its (slow) push
        assert sorted(table.records) == [("a", 1), ("b", 2)]
        assert pusher.fence({1}) == 0  # nothing left outside the cycle
        later = _event_of(1)
        pusher.hold("c", state, 1, later)  # an agent's batch still running after the fence
        assert pusher.mark_dirty([("d", state, 1)]) == 0
        await asyncio.sleep(0.5)  # the cycle's push returns: fenced meanwhile, so no ack
        assert [event.acked for event in in_flight] == [0, 0]
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)  # partition 2's entity was given back
        assert later.acked == 0 and in_flight[0].acked == 0
        assert in_flight[1].acked == 1
        assert sorted(table.records) == [("a", 1), ("b", 2), ("b", 2)]
        pusher.unfence({1})
        again = _event_of(1)
        pusher.hold("a", state, 1, again)
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)
        assert again.acked == 1 and table.records[-1] == ("a", 1)

    asyncio.run(main())


def test_a_fence_frees_an_agent_waiting_for_room_while_the_push_waits_to_coalesce() -> None:
    """An agent in ``kick``'s backpressure wait gets room when a fence drops the held events,
    even though the push task it waits on was cancelled before its cycle began (in its coalescing
    wait: no cycle ends, so no cycle notifies). It used to wait forever, and its unacked batch
    held Faust's revoke for good (the broker fault tests' stalled worker)."""
    table, sink = _RecordingTable(), _SlowSink(delay_s=0.0)
    state = _one_event_state()

    async def main() -> None:
        pusher = _pusher(table, sink, max_pending=2, min_interval_s=30.0)
        pusher.hold("a", state, 1, _event_of(1))
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)  # the first cycle: the next one waits 30 s
        pusher.hold("b", state, 1, _event_of(1))
        pusher.hold("c", state, 1, _event_of(1))
        agent = asyncio.ensure_future(pusher.kick())  # no room: waits for the push
        await asyncio.sleep(0.2)
        assert not agent.done()
        assert pusher.fence({1}) == 2
        await asyncio.wait_for(agent, timeout=5)
        assert pusher.pending == 0

    asyncio.run(main())


class _RefusingTable(_RefusingOnceTable):
    """Every changelog record is refused: each cycle fails and waits before the next."""

    async def save(self, key: str, state: EntityState, partition: int) -> Any:
        delivered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        delivered.set_exception(RuntimeError("NotEnoughReplicas"))
        return delivered


@pytest.mark.parametrize("when", ["in its push", "waiting to retry a failed cycle"])
def test_a_cancelled_push_cycle_keeps_no_reference_to_the_fenced_events(when: str) -> None:
    """A fenced partition's events in a cycle in flight are let go of entirely: Faust's revoke
    waits until its unacked records are garbage (a weak set), and the cancelled push task kept
    them alive through its CancelledError's traceback (the frame's ``held`` list), so the revoke
    waited for good."""
    if when == "in its push":
        table, sink = _RecordingTable(), _SlowSink(delay_s=0.3)
    else:
        table, sink = _RefusingTable(), _SlowSink(delay_s=0.0)
    state = _one_event_state()

    async def main() -> None:
        pusher = _pusher(table, sink, retry_max_s=5.0)
        messages = []
        for n in range(3):
            event = _event_of(1)
            messages.append(weakref.ref(event.message))
            pusher.hold(f"u{n}", state, 1, event)
        del event
        await pusher.kick()
        await asyncio.sleep(0.1)  # the cycle is in its (slow) push
        pusher.fence({1})
        await asyncio.sleep(0.5)
        gc.collect()
        assert pusher._task is not None and pusher._task.cancelled()
        assert [ref() for ref in messages] == [None, None, None]

    asyncio.run(main())


class _TimedSink(_SlowSink):
    """A slow push that records when each push began and ended, and how many rows it carried."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s)
        self.pushes: list[tuple[float, float, int]] = []

    def push(self, view: str, rows: Sequence[FeatureRow]) -> None:
        started = time.monotonic()
        super().push(view, rows)
        self.pushes.append((started, time.monotonic(), len(rows)))


@pytest.mark.parametrize("busy_share", [1.0, 0.25])
def test_pushes_are_paced_by_their_own_cost(busy_share: float) -> None:
    """After a push of d seconds the next waits d * (1 / busy_share - 1) from its end, and what
    was held meanwhile goes out in that one push; at a share of 1 pushes run back to back."""
    delay_s = 0.3
    table, sink = _RecordingTable(), _TimedSink(delay_s=delay_s)
    state = _one_event_state()

    async def main() -> None:
        pusher = _pusher(table, sink, busy_share=busy_share)
        pusher.hold("a", state, 0, _Event())
        await pusher.kick()
        await asyncio.sleep(delay_s / 3)  # the first push is running
        for key in ("b", "c"):
            pusher.hold(key, state, 0, _Event())
            await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)

    asyncio.run(main())
    (_, first_end, _), (second_start, _, second_rows) = sink.pushes
    assert second_rows == 2
    rest_s = delay_s * (1 / busy_share - 1)
    assert second_start - first_end >= rest_s - 0.01
    assert second_start - first_end < rest_s + 2 * delay_s  # back to back at a share of 1


class _WarmingSink(_TimedSink):
    """Its first push waits for a warm-up of ``warm_up_s`` in progress (a worker's start)."""

    def __init__(self, warm_up_s: float) -> None:
        super().__init__(delay_s=0.0)
        self.warm_up_s = warm_up_s

    def warm_up(self) -> None:
        time.sleep(self.warm_up_s)
        self.warm_up_s = 0.0


def test_a_warm_up_the_first_push_waited_for_does_not_pace_the_next() -> None:
    """Only the write paces: a push that first waited seconds for the sink's warm-up is followed
    by the next at once (it was: the next waited as long again, at a share of 0.5)."""
    table, sink = _RecordingTable(), _WarmingSink(warm_up_s=1.0)
    state = _one_event_state()

    async def main() -> None:
        pusher = _pusher(table, sink, busy_share=0.25)
        pusher.hold("a", state, 0, _Event())
        await pusher.kick()
        await asyncio.sleep(0.5)  # the first push waits for the warm-up
        pusher.hold("b", state, 0, _Event())
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)

    asyncio.run(main())
    (_, first_end, _), (second_start, _, _) = sink.pushes
    assert second_start - first_end < 0.5  # paced by the warm-up it would be 3 s


def test_hurry_pushes_what_is_held_at_once_and_unpaced_for_its_time() -> None:
    """A revoke's wait (``RevokeFence.waiting``) cuts short a pacing wait in progress, and the
    pushes of the next ``for_s`` seconds are not paced either; after that pacing is back."""
    delay_s = 0.2
    table, sink = _RecordingTable(), _TimedSink(delay_s=delay_s)
    state = _one_event_state()
    rest_s = delay_s * (1 / 0.1 - 1)  # 1.8 s after each push

    async def push_one(pusher: ViewPusher, key: str) -> None:
        pusher.hold(key, state, 0, _Event())
        await pusher.kick()
        await asyncio.wait_for(pusher.drain(), timeout=10)

    async def main() -> list[float]:
        pusher = _pusher(table, sink, busy_share=0.1)
        await push_one(pusher, "a")
        pusher.hold("b", state, 0, _Event())
        await pusher.kick()
        await asyncio.sleep(0.3)  # "b" waits for its pace
        hurried_at = time.monotonic()
        pusher.hurry(for_s=1.0)
        await asyncio.wait_for(pusher.drain(), timeout=10)
        await push_one(pusher, "c")  # within the hurry: at once
        await asyncio.sleep(1.0)
        await push_one(pusher, "d")  # the hurry is over
        return [hurried_at]

    (hurried_at,) = asyncio.run(main())
    starts = [start for start, _, _ in sink.pushes]
    ends = [end for _, end, _ in sink.pushes]
    assert starts[1] - hurried_at < delay_s
    assert starts[2] - ends[1] < delay_s
    assert starts[3] - ends[2] >= rest_s - 0.01
