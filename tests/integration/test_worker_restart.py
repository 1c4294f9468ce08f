"""A Faust worker whose producer crashes exits, and supervisord starts it again.

The failure is the one that happened (2026-11-30): the joiner's producer refused a join-state
message over Kafka's 1 MiB limit. The joiner now caps its state below that limit, so here the
join table's changelog topic is created beforehand with a 20 kB ``max.message.bytes``: the broker
refuses one user's state after a burst of impressions, as it refused the 1 MiB one, and the joiner
runs under its own stack's supervisord. A refused changelog record is only logged by Faust, so
the joiner watches each one and exits itself (``streams.joiner_app``): going on would leave a
state in memory that no restart can recover.

Two exits are possible, and either must end in a restart. Sometimes Faust's worker stops itself
after the producer buffer's crash (exit status 1). Sometimes it does not: in the 50,000-visit loop
the process stayed up, and in one CI run of this test the worker began to stop and hung at "Wait
for streams..." for three minutes, until the test gave up (the watchdog was then an app timer,
stopped with the app). ``streams/watchdog.py`` ends that case (exit status ``watchdog.EXIT_CODE``).
What matters to a user is the same in both: the program is not left running dead, and supervisord
starts it again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from streamrec.core.settings import CommonSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import stack_settings_on_free_ports
from streams import watchdog
from streams.joiner_settings import JoinerTuning
from tests.support.impression_burst import produce_one_users_burst


class _NotYet(Exception):
    pass


def test_a_worker_with_a_crashed_producer_exits_and_supervisord_restarts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack hands its own STREAMREC_* environment to the programs it runs.
    monkeypatch.setenv("STREAMREC_JOINER__MAX_OPEN_PER_USER", "1000000")
    monkeypatch.setenv("STREAMREC_JOINER__LABEL_WINDOW_S", "600")  # every impression stays open
    stack_settings = stack_settings_on_free_ports(tmp_path / "stack")
    stack = LocalStack(stack_settings)
    stack.up()
    try:
        settings = CommonSettings(kafka=stack_settings.kafka, redis=stack_settings.redis, paths=stack_settings.paths)
        ensure_topics(settings)
        changelog = f"{JoinerTuning().app_id}-join_state-changelog"
        small_records = NewTopic(
            changelog, num_partitions=settings.topics.partitions, config={"max.message.bytes": "20000"}
        )
        admin = AdminClient(settings.kafka.client_config())  # kept alive until its future resolves
        admin.create_topics([small_records])[changelog].result(timeout=30)
        produce_one_users_burst(settings, 300)
        stack.start("joiner")
        first_pid = next(info["pid"] for info in stack.status() if info["name"] == "joiner")

        for attempt in Retrying(
            stop=stop_after_delay(180), wait=wait_fixed(1), retry=retry_if_exception_type(_NotYet), reraise=True
        ):
            with attempt:
                joiner = next(info for info in stack.status() if info["name"] == "joiner")
                if joiner["statename"] != "RUNNING" or joiner["pid"] == first_pid:
                    raise _NotYet(f"joiner {joiner['statename']}, pid {joiner['pid']} (first {first_pid})")
        supervisor_log = (stack.log_dir / "supervisord.log").read_text()
        joiner_log = (stack.log_dir / "joiner.log").read_text()
    finally:
        stack.down()

    exits = re.findall(r"exited: joiner \(exit status (\d+); not expected\)", supervisor_log)
    assert exits, supervisor_log
    assert int(exits[0]) in {1, watchdog.EXIT_CODE}, supervisor_log
    if int(exits[0]) == watchdog.EXIT_CODE:
        # the watchdog (the producer crashed), or the joiner itself (Kafka refused a changelog record)
        assert (
            "exiting so the supervisor restarts this worker; crashed: producer" in joiner_log
            or "exiting so the supervisor restarts the joiner" in joiner_log
        ), joiner_log[-3000:]
    assert "MessageSizeTooLarge" in joiner_log, joiner_log[-3000:]
