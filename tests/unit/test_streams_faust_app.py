"""The one Faust app factory (``streams.faust_app``): both apps are built alike from the shared settings."""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import faust
import pytest
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP
from faust.types.enums import ProcessingGuarantee

from streamrec.core.errors import SettingsError
from streamrec.core.settings import CommonSettings, KafkaSettings, PathSettings, TopicSettings
from streams.app import GroupStartOffsets, create_app
from streams.faust_app import GaplessConsumer, revoke_fence
from streams.joiner_app import create_joiner
from streams.joiner_settings import JoinerSettings, JoinerTuning
from streams.settings import StreamsSettings, StreamsTuning


class NoSink:
    def warm_up(self) -> None:
        pass

    def push(self, view: Any, rows: Any) -> None:
        raise AssertionError("nothing is pushed here")


def build_worker(shared: dict[str, Any], **tuning: Any) -> tuple[CommonSettings, faust.App]:
    settings = StreamsSettings(**shared, streams=StreamsTuning(app_id="unit-worker", **tuning))
    return settings, create_app(settings, sink=NoSink()).app


def build_joiner(shared: dict[str, Any], **tuning: Any) -> tuple[CommonSettings, faust.App]:
    settings = JoinerSettings(**shared, joiner=JoinerTuning(app_id="unit-joiner", **tuning))
    return settings, create_joiner(settings).app


Builder = Callable[..., tuple[CommonSettings, faust.App]]
BUILDERS = pytest.mark.parametrize("build", [build_worker, build_joiner], ids=["worker", "joiner"])


def built_in_a_loop(build: Builder, shared: dict[str, Any], **tuning: Any) -> tuple[CommonSettings, faust.App]:
    """Faust binds an app to the running loop, so build it inside one."""

    async def main() -> tuple[CommonSettings, faust.App]:
        return build(shared, **tuning)

    result = asyncio.run(main())
    gc.collect()
    return result


@BUILDERS
def test_both_apps_connect_as_the_settings_kafka_principal(build: Builder, tmp_path: Path) -> None:
    password = tmp_path / "kafka-password"
    password.write_text("s3cret\n")
    kafka = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_username="streams", sasl_password_file=password)
    _, app = built_in_a_loop(build, {"kafka": kafka, "paths": PathSettings(state_dir=tmp_path / "state")})
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == (
        "streams",
        "s3cret",
        "SCRAM-SHA-512",
    )


@BUILDERS
def test_both_apps_refuse_a_password_file_they_cannot_read(build: Builder, tmp_path: Path) -> None:
    kafka = KafkaSettings(security_protocol="SASL_SSL", sasl_username="streams", sasl_password_file=tmp_path / "gone")
    with pytest.raises(SettingsError, match="gone"):
        built_in_a_loop(build, {"kafka": kafka, "paths": PathSettings(state_dir=tmp_path / "state")})
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


@BUILDERS
def test_both_apps_are_built_from_the_shared_settings(build: Builder, tmp_path: Path) -> None:
    shared = {
        "kafka": KafkaSettings(bootstrap_servers="kafka-a:9092, kafka-b:9093", client_id="unit-client"),
        "topics": TopicSettings(partitions=3, replication_factor=3, min_insync_replicas=2),
        "paths": PathSettings(state_dir=tmp_path),
    }
    settings, app = built_in_a_loop(build, shared, commit_interval_s=2.5, state_dir=tmp_path / "own")
    conf: Any = app.conf  # Faust declares some settings as descriptors, not as their values
    assert [str(url) for url in conf.broker] == ["kafka://kafka-a:9092", "kafka://kafka-b:9093"]
    assert conf.broker_client_id == "unit-client"
    assert conf.processing_guarantee == ProcessingGuarantee.AT_LEAST_ONCE
    assert conf.broker_commit_interval == 2.5
    assert (conf.topic_partitions, conf.topic_replication_factor) == (3, 3)
    assert conf.producer_acks == -1  # acks=all
    # topics Faust creates itself (changelogs, repartition, the leader topic) carry min.insync.replicas
    assert {table.changelog_topic.config["min.insync.replicas"] for table in app.tables.values()} == {"2"}
    assert app.topic("internal-x", internal=True, config={"cleanup.policy": "compact"}).config == {
        "min.insync.replicas": "2",
        "cleanup.policy": "compact",
    }
    assert conf.consumer_auto_offset_reset == "earliest"
    assert (conf.key_serializer, conf.value_serializer) == ("raw", "raw")
    assert str(conf.store) == "memory:"
    assert conf.web_enabled is False
    assert Path(conf.datadir) == tmp_path / "own"
    assert (tmp_path / "own").is_dir()  # the state directory is created with the app


def test_each_app_keeps_its_own_faust_options(tmp_path: Path) -> None:
    shared = {"paths": PathSettings(state_dir=tmp_path)}
    _, worker = built_in_a_loop(build_worker, shared, web_port=6123, session_timeout_s=12.0, producer_linger_s=0.01)
    _, joiner = built_in_a_loop(build_joiner, shared)
    assert (worker.conf.web_enabled, worker.conf.web_port, worker.conf.web_bind) == (True, 6123, "127.0.0.1")
    assert (worker.conf.broker_session_timeout, worker.conf.broker_heartbeat_interval) == (12.0, 1.2)
    assert (worker.conf.producer_linger, worker.conf.table_standby_replicas) == (0.01, 0)
    assert joiner.conf.table_standby_replicas == faust.App("defaults").conf.table_standby_replicas
    assert sorted(path.name for path in tmp_path.iterdir()) == ["joiner", "streams"]


@BUILDERS
def test_both_apps_produce_with_acks_all_and_idempotence(build: Builder, tmp_path: Path) -> None:
    """Faust enables idempotence only in transactions; ``IdempotentProducer`` overrides the private
    ``_settings_extra`` for at-least-once too. This reads the aiokafka producer Faust actually builds,
    so a Faust or aiokafka upgrade that bypasses the override fails here."""

    async def main() -> tuple[object, int]:
        _, app = build({"paths": PathSettings(state_dir=tmp_path)})
        client = app.producer._new_producer()
        try:
            return client._txn_manager, client._sender._acks
        finally:
            await client.stop()

    txn_manager, acks = asyncio.run(main())
    gc.collect()
    assert txn_manager is not None  # aiokafka's idempotence state (producer id and sequence numbers)
    assert acks == -1


@BUILDERS
def test_neither_app_commits_past_a_record_its_agents_never_acked(build: Builder, tmp_path: Path) -> None:
    """Faust's own consumer notes an offset jump as a gap and commits over it; ours stops at the
    first offset not acked, so a partition's next owner never starts after unprocessed records."""

    async def next_commit(consumer: Any, add_gap: Any, partition: int) -> tuple[int | None, int | None]:
        tp = TP("events", partition)
        consumer._committed_offset[tp] = 10  # Faust keeps the next offset to read
        await add_gap(tp, 11, 20)  # Faust read 10, then 21: 11..20 were skipped
        consumer._acked[tp].extend([10, 21])
        first = consumer._committed_offset[tp] = consumer._new_offset(tp)  # as a commit does
        consumer._acked[tp].extend(range(11, 21))  # the skipped records are read again and acked
        return first, consumer._new_offset(tp)

    async def main() -> tuple[type, tuple[int | None, int | None], tuple[int | None, int | None]]:
        _, app = build({"paths": PathSettings(state_dir=tmp_path)})
        consumer: Any = app.consumer
        fausts_own = functools.partial(aiokafka_driver.Consumer._add_gap, consumer)
        return (
            type(consumer),
            await next_commit(consumer, consumer._add_gap, 0),
            await next_commit(consumer, fausts_own, 1),
        )

    consumer_class, ours, fausts = asyncio.run(main())
    gc.collect()
    assert consumer_class is GaplessConsumer
    assert ours == (11, 22)  # up to the hole; past it once the hole is read
    assert fausts[0] == 22  # what Faust alone would commit: over 11..20


class _Fetched:
    def __init__(self, offset: int) -> None:
        self.offset = offset


def test_skipped_records_are_read_again_and_a_rewind_holds_until_its_record_comes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``GaplessConsumer``: an offset jump on an agent topic seeks back to the first skipped offset;
    records fetched before a seek (past the rewind) are dropped, and Faust's read offset is not
    raised past it, so the drain loop cannot drop the re-read record; the re-read closes the
    rewind; a rewind still open ``reseek_after_s`` later is sought again, and given up after a few
    seeks; a revoked partition's progress is forgotten; a jump on a topic no agent acks (a
    compacted changelog) is no gap."""
    sought: list[tuple[int, int]] = []
    fetched: list[tuple[TP, _Fetched]] = []

    async def fake_seek(self: Any, partition: TP, offset: int) -> None:
        sought.append((partition.partition, offset))

    async def fake_getmany(self: Any, timeout: float) -> Any:
        for item in fetched:
            yield item

    monkeypatch.setattr(GaplessConsumer, "_seek", fake_seek)
    monkeypatch.setattr(aiokafka_driver.Consumer, "getmany", fake_getmany, raising=False)

    async def main() -> None:
        settings, app = build_worker({"paths": PathSettings(state_dir=tmp_path)})
        consumer: Any = app.consumer
        tp, other = TP(settings.topics.interactions, 0), TP(settings.topics.interactions, 1)
        changelog = TP("unit-worker-user_activity-changelog", 0)
        app.topics._acking_topics.add(tp.topic)  # as the conductor does when the agents subscribe

        async def passed(*batch: tuple[TP, int]) -> list[tuple[int, int]]:
            fetched[:] = [(partition, _Fetched(offset)) for partition, offset in batch]
            return [(partition.partition, message.offset) async for partition, message in consumer.getmany(1.0)]

        assert await passed((tp, 5), (tp, 6), (changelog, 3), (changelog, 9)) == [(0, 5), (0, 6), (0, 3), (0, 9)]
        assert await passed((tp, 9), (other, 3), (tp, 10)) == [(1, 3)]  # 7 and 8 were skipped
        assert sought == [(0, 7)]
        assert consumer._read_offset[tp] == 7  # as Faust's seek sets it
        consumer._read_offset[tp] = 12  # a record already on its way when the seek came
        assert consumer._read_offset[tp] == 7  # is not read past the rewind
        assert await passed((tp, 11)) == []  # fetched before the seek: dropped, no second seek
        await consumer.retry_rewinds()
        assert sought == [(0, 7)]  # not due yet
        assert await passed((tp, 7), (tp, 8), (tp, 9)) == [(0, 7), (0, 8), (0, 9)]  # the re-read closes it
        assert consumer.open_rewinds == {}
        consumer._read_offset[tp] = 9
        assert consumer._read_offset[tp] == 9
        consumer.reseek_after_s = 0.0
        assert await passed((tp, 12)) == []  # 10, 11 skipped
        for _ in range(4):
            await consumer.retry_rewinds()  # still waiting: sought again three times, then given up
        assert sought == [(0, 7), (0, 10), (0, 10), (0, 10), (0, 10)]
        assert consumer.open_rewinds == {}
        assert await passed((tp, 16)) == [(0, 16)]
        consumer.forget_partitions({tp})
        assert await passed((tp, 30)) == [(0, 30)]  # a partition back after a revoke starts anew
        assert len(sought) == 5

    asyncio.run(main())
    gc.collect()


class _HeldMessage:
    """What Faust's wait reads of a message an agent holds: its partition and whether it is acked."""

    def __init__(self, tp: TP) -> None:
        self.tp = tp
        self.offset = 7
        self.acked = False
        self.refcount = 1


def test_a_revoke_fences_the_partitions_of_records_still_held_at_its_fence_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``GaplessConsumer.wait_empty`` (before a revoke): records acked in time end the wait with
    no fence. Records still held at ``RevokeFence.wait_s`` fence the held records' partitions and
    the assigned ones: the pipeline's pushers write and ack nothing more for them until they are
    assigned again, and drop what they hold, which ends the wait; a record still in an agent's
    hands is waited for (no agent is left in the middle of a batch). Without the fence, a worker
    whose pushes stall outwaits the group's rebalance timeout and writes its stale states after
    their next owner restored them. When the wait begins, the pushers are told to push unpaced."""
    commits: list[str] = []

    async def no_commit(self: Any, *args: Any, **kwargs: Any) -> bool:
        commits.append("commit")
        return False

    monkeypatch.setattr(GaplessConsumer, "commit", no_commit)
    monkeypatch.setattr(GaplessConsumer, "commit_and_end_transactions", no_commit)

    async def main() -> None:
        settings = StreamsSettings(
            paths=PathSettings(state_dir=tmp_path), streams=StreamsTuning(app_id="unit-worker", session_timeout_s=6.0)
        )
        worker = create_app(settings, sink=NoSink())
        app, pipeline = worker.app, worker.pipeline
        pipeline.start_offset = None  # no broker to ask
        consumer: Any = app.consumer
        fence = revoke_fence(app)
        assert fence.wait_s == pytest.approx(3.0) == fence.give_up_s  # half the rebalance timeout
        fence.wait_s, fence.give_up_after_s = 0.5, 60.0
        assert fence.waiting == [pipeline.hurry_pushes]  # the pushers push unpaced while a revoke waits
        told: list[float] = []
        fence.waiting.append(told.append)
        by_item, users = TP(settings.by_item_topic, 2), TP(settings.topics.interactions, 1)
        monkeypatch.setattr(GaplessConsumer, "assignment", lambda self: {users})
        loop = asyncio.get_running_loop()

        in_time = _HeldMessage(by_item)
        consumer._unacked_messages.add(in_time)
        loop.call_later(0.1, lambda: setattr(in_time, "acked", True))
        await asyncio.wait_for(consumer.wait_empty(), timeout=5)
        assert pipeline.pusher("item_stats").fenced == set()
        assert told == [0.5]  # when the wait began, with the time it has

        # held by a pusher (only referenced there: dropped at the fence), and by an agent's batch
        held_by_pusher = [_HeldMessage(by_item)]
        fence.listeners.append(lambda partitions: held_by_pusher.clear())
        in_agent = _HeldMessage(users)
        consumer._unacked_messages.update([held_by_pusher[0], in_agent])
        waiting = asyncio.ensure_future(consumer.wait_empty())
        while not pipeline.pusher("item_stats").fenced:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert held_by_pusher == []
        assert not waiting.done()  # the agent's batch still holds a record
        in_agent.acked = True  # its batch ends
        await asyncio.wait_for(waiting, timeout=30)
        assert pipeline.pusher("item_stats").fenced == {2}
        assert pipeline.pusher("user_activity").fenced == {1}
        await app.on_partitions_assigned.send({by_item})
        assert pipeline.pusher("item_stats").fenced == set()
        assert pipeline.pusher("user_activity").fenced == {1}

        # a record held for good (seen held by Faust's stream iterator): give_up_s after the fence
        # the process exits for its supervisor to restart it, nothing committed past the record
        fence.give_up_after_s = 0.3
        exits: list[float] = []
        consumer.exit_for_restart = lambda: exits.append(time.monotonic())
        stuck = _HeldMessage(users)
        consumer._unacked_messages.add(stuck)
        started = time.monotonic()
        await asyncio.wait_for(consumer.wait_empty(), timeout=30)
        assert len(exits) == 1 and exits[0] - started >= fence.wait_s + fence.give_up_s
        assert not stuck.acked

    asyncio.run(main())
    gc.collect()
    assert commits  # the wait commits what is acked while it waits, as Faust's does


class _Record:
    """Stands in for a Faust event in an agent's batch (weakly referenceable)."""


def test_an_agent_keeps_no_reference_to_its_batch_while_it_waits_for_the_next(tmp_path: Path) -> None:
    """The worker's agents let go of a batch before they yield its report: a record the fence
    dropped unacked is then referenced by nothing of ours while the agent waits for the next
    batch (which never comes during a revoke), so the fenced revoke's wait can end."""

    class _OneBatch:
        def __init__(self, batch: list[_Record]) -> None:
            self.batch = batch

        async def take_events(self, max_: int, within: float) -> AsyncIterator[list[_Record]]:
            yield self.batch
            self.batch = []
            await asyncio.Event().wait()  # no next batch: a revoke paused the consumer

    async def main() -> None:
        worker = create_app(StreamsSettings(paths=PathSettings(state_dir=tmp_path)), sink=NoSink())

        async def report(events: list[_Record]) -> str:
            return f"{len(events)} events"

        worker.pipeline.ingest_batch = report  # type: ignore[method-assign]
        worker.pipeline.item_batch = report  # type: ignore[method-assign]
        for agent in (worker.ingest, worker.item_stats):
            record = _Record()
            source = _OneBatch([record])
            held = weakref.ref(record)
            del record
            reports = agent.fun(source)
            assert await reports.__anext__() == "1 events"
            waiting = asyncio.ensure_future(reports.__anext__())  # as Faust asks for the next report
            await asyncio.sleep(0.05)
            gc.collect()
            assert not waiting.done() and held() is None
            waiting.cancel()

    asyncio.run(main())


class _SlowOffsets:
    """A stand-in for ``KafkaOffsets``: each read blocks until ``release`` is set (a broker down)."""

    def __init__(self, fail: bool = False) -> None:
        self.release, self.fail = threading.Event(), fail
        self.reads: list[list[tuple[str, int]]] = []

    def read(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        self.reads.append(partitions)
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("coordinator not available")
        return {key: (40 + key[1], 100) for key in partitions}


def test_start_offsets_are_read_once_per_assignment_and_an_agent_never_waits_past_its_bound() -> None:
    """``GroupStartOffsets``: the partitions of an assignment are read in one call, started at the
    assignment; an agent asking while the read hangs (a broker down) gets None after ``wait_s``
    instead of holding its batch; a later assignment reads again; a failed read answers None."""

    async def main() -> None:
        offsets = _SlowOffsets()
        starts = GroupStartOffsets(offsets, wait_s=0.2)  # type: ignore[arg-type]
        starts.prefetch({("t", 0), ("t", 1)})
        assert await starts("t", 0) is None  # the read still hangs: the agent goes on
        offsets.release.set()
        assert await starts("t", 1) == 41
        await asyncio.sleep(0.05)
        assert offsets.reads == [[("t", 0), ("t", 1)]]
        starts.prefetch({("t", 0)})  # assigned again
        assert await starts("t", 0) == 40
        assert await starts("t", 2) == 42  # no prefetch (a record before the signal): read on demand
        assert len(offsets.reads) == 3

        failing = _SlowOffsets(fail=True)
        failing.release.set()
        starts = GroupStartOffsets(failing, wait_s=5.0, retry_s=0.0)  # type: ignore[arg-type]
        starts.prefetch({("t", 0)})
        assert await starts("t", 0) is None

    asyncio.run(main())


class _FlakyOffsets(_SlowOffsets):
    """Fails its first ``failures`` reads (a broker stopped), then answers."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.release.set()
        self.failures = failures

    def read(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        self.fail = len(self.reads) < self.failures
        return super().read(partitions)


def test_a_failed_start_read_is_tried_again_and_a_late_answer_goes_to_the_check_of_its_assignment() -> None:
    """``GroupStartOffsets``: a read that fails is tried again, so an agent still gets the answer
    within its wait; an answer after the agent went on is handed to ``on_late``, unless the
    partition was assigned again meanwhile (the answer was about the old assignment)."""

    async def main() -> None:
        flaky = _FlakyOffsets(failures=2)
        starts = GroupStartOffsets(flaky, wait_s=5.0)  # type: ignore[arg-type]
        starts.prefetch({("t", 0)})
        assert await starts("t", 0) == 40
        assert len(flaky.reads) == 3

        late: list[tuple[str, int, int]] = []
        slow = _SlowOffsets()
        starts = GroupStartOffsets(slow, wait_s=0.1)  # type: ignore[arg-type]
        starts.on_late = lambda topic, partition, start: late.append((topic, partition, start))
        starts.prefetch({("t", 0), ("t", 1)})
        assert await starts("t", 0) is None
        assert await starts("t", 1) is None
        starts.prefetch({("t", 1)})  # assigned again before the first read answered
        slow.release.set()
        for _ in range(100):
            if late:
                break
            await asyncio.sleep(0.02)
        assert await starts("t", 1) == 41  # the new assignment's own read
        assert late == [("t", 0, 40)]

    asyncio.run(main())
