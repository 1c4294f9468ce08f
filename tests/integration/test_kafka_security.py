"""Kafka on the secure stack (``stack up --secure``), against a real broker: SASL/SCRAM over TLS
with one principal per service and ACLs (``streamrec.ops.stack.kafka_access``).

Refused: a plaintext client, a client that trusts another CA, a wrong password, a service on a
topic that is not its own. Allowed: the replay producer writes interactions, the feature worker
(``streamrec streams worker`` under the stack, as ``streams``) reads them, keeps its changelogs
and pushes features; the joiner (as ``joiner``) labels the API's impressions and the evaluator
reads the labels. No password appears on a command line or in a process environment.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from pydantic import SecretStr

from streamrec.core.events import Click, Impression, ImpressionItem, LabeledExample, decode_event
from streamrec.core.settings import KafkaSettings
from streamrec.datasets import movielens
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.replay import producer_config, replay
from streamrec.ops.settings import ReplaySettings
from streamrec.ops.stack import kafka_access
from streamrec.ops.stack.certs import LocalCA, write_private
from streamrec.ops.stack.local_stack import LocalStack
from streams.settings import StreamsSettings
from tests.support.cluster import running_cluster

FEATURES_APP = "streamrec-features"  # the worker's default app id: its group and topic prefix


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with pytest.MonkeyPatch.context() as environment:
        # handed to the stack's programs: the joiner labels two seconds after an impression
        environment.setenv("STREAMREC_JOINER__LABEL_WINDOW_S", "2")
        environment.setenv("STREAMREC_JOINER__GRACE_S", "0.5")
        with running_cluster(Path(tmp_path_factory.mktemp("secure")), brokers=1, secure=True) as stack:
            ensure_topics(stack.client_settings())  # as admin, as `stack up` does
            yield stack


def kafka_as(stack: LocalStack, identity: str, **overrides: Any) -> KafkaSettings:
    return KafkaSettings(**{**stack.client_settings(identity).kafka.model_dump(), **overrides})


def refusal(kafka: KafkaSettings) -> str:
    """What librdkafka reports when an admin client with ``kafka`` asks for metadata (it must fail)."""
    errors: list[str] = []
    config: dict[str, Any] = {**kafka.client_config(), "error_cb": lambda error: errors.append(str(error))}
    admin = AdminClient(config)
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=3)
    admin.poll(1)  # serves error_cb
    return " | ".join(errors)


def delivery_errors(kafka: KafkaSettings, topic: str) -> list[KafkaError | None]:
    """Produce one record to ``topic`` and return its delivery's error (None: written)."""
    results: list[KafkaError | None] = []
    producer = Producer({**kafka.client_config(), "message.timeout.ms": 10_000})
    producer.produce(topic, value=uuid.uuid4().bytes, on_delivery=lambda error, _: results.append(error))
    assert producer.flush(30) == 0
    return results


def read(
    kafka: KafkaSettings, group: str, topic: str, until: bytes | None = None, timeout_s: float = 15.0
) -> tuple[set[bytes], set[int]]:
    """Subscribe to ``topic`` in ``group`` from its start, without committing, until ``until`` is
    read (or, without it, an authorization error comes): the values and the error codes."""
    consumer = Consumer(
        {**kafka.client_config(), "group.id": group, "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    )
    values: set[bytes] = set()
    codes: set[int] = set()
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (until not in values if until else not codes & REFUSED):
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                codes.add(error.code())
            else:
                values.add(message.value() or b"")
    finally:
        consumer.close()
    return values, codes


REFUSED = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED}


# -- who gets in -----------------------------------------------------------------------------------
def test_a_plaintext_client_is_refused(secure_stack: LocalStack) -> None:
    admin = AdminClient(kafka_as(secure_stack, "admin").client_config())
    assert admin.list_topics(timeout=10).topics  # the right settings do get in
    refusal(KafkaSettings(bootstrap_servers=secure_stack.bootstrap_servers()))


def test_a_client_trusting_another_ca_is_refused(secure_stack: LocalStack, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other-ca")
    reason = refusal(kafka_as(secure_stack, "admin", ssl_ca_file=other.ca_file))
    assert "certificate verify failed" in reason


def test_a_wrong_password_is_refused(secure_stack: LocalStack) -> None:
    wrong = kafka_as(secure_stack, "replay", sasl_password_file=None, sasl_password=SecretStr("not-the-password"))
    assert "Authentication failed" in refusal(wrong)


# -- what each service may do ----------------------------------------------------------------------
def test_a_service_cannot_read_or_write_another_services_topics(secure_stack: LocalStack) -> None:
    topics = secure_stack.topic_settings()
    api = kafka_as(secure_stack, "api")
    described = AdminClient(api.client_config()).list_topics(topics.interactions, timeout=10).topics
    error = described[topics.interactions].error
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
    _, codes = read(api, "api-reads", topics.interactions)  # it has no group either
    assert codes & REFUSED, codes
    # the trainer may use its group, but impressions are not its topic
    _, codes = read(kafka_as(secure_stack, "trainer"), "streamrec-trainer", topics.impressions)
    assert KafkaError.TOPIC_AUTHORIZATION_FAILED in codes, codes
    [refused] = delivery_errors(api, topics.interactions)
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    [reader_writes] = delivery_errors(kafka_as(secure_stack, "streams"), topics.interactions)
    assert reader_writes is not None and reader_writes.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    [allowed] = delivery_errors(api, topics.impressions)  # its own topic
    assert allowed is None
    admin = AdminClient(api.client_config())
    [created] = admin.create_topics([NewTopic(f"api-{uuid.uuid4().hex[:6]}", 1, 1)]).values()
    with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
        created.result(timeout=15)


def test_replay_produces_interactions_and_the_worker_identity_consumes_them(secure_stack: LocalStack) -> None:
    topics = secure_stack.topic_settings()
    replay_kafka = kafka_as(secure_stack, "replay")
    sent: list[bytes] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        assert error is None, error
        sent.append(message.value() or b"")

    # the replay's own producer configuration: acks=all and idempotent, under its WRITE grant alone
    producer = Producer({**producer_config(ReplaySettings(kafka=replay_kafka)), "on_delivery": on_delivery})
    values = [f"probe-{uuid.uuid4().hex}".encode() for _ in range(20)]
    for value in values:
        producer.produce(topics.interactions, value=value)
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            **kafka_as(secure_stack, "streams").client_config(),
            "group.id": FEATURES_APP,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,  # leaves the worker's group where it is
        }
    )
    seen: set[bytes] = set()
    try:
        consumer.subscribe([topics.interactions])
        deadline = time.monotonic() + 30
        while not set(values) <= seen and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None:
                assert message.error() is None, message.error()
                seen.add(message.value() or b"")
    finally:
        consumer.close()
    assert set(values) <= seen


def test_a_service_ensuring_the_topics_skips_those_it_may_not_see(secure_stack: LocalStack) -> None:
    assert ensure_topics(secure_stack.client_settings("api")) == []


def test_acl_sync_removes_a_grant_that_is_not_in_the_table(secure_stack: LocalStack) -> None:
    admin_kafka = kafka_as(secure_stack, "admin")
    impressions = secure_stack.topic_settings().impressions
    trainer, group = kafka_as(secure_stack, "trainer"), "streamrec-trainer"  # a group it may use
    marker = f"impression-{uuid.uuid4().hex}".encode()
    producer = Producer(kafka_as(secure_stack, "api").client_config())
    producer.produce(impressions, value=marker)
    assert producer.flush(30) == 0
    grants = kafka_access.service_acls(secure_stack.client_settings())
    kafka_access.sync_acls(admin_kafka, [*grants, kafka_access.Grant("trainer", "topic", impressions, ("READ",))])
    values, _ = read(trainer, group, impressions, until=marker, timeout_s=30)
    assert marker in values  # the extra grant works
    kafka_access.sync_acls(admin_kafka, grants)
    _, codes = read(trainer, group, impressions)
    assert KafkaError.TOPIC_AUTHORIZATION_FAILED in codes, codes


def test_a_replaced_password_file_takes_effect_when_the_stack_applies_its_access(secure_stack: LocalStack) -> None:
    assert secure_stack.secrets is not None
    api = secure_stack.secrets.identities["api"]
    old = api.kafka_password()
    write_private(api.kafka_password_file, f"{uuid.uuid4().hex}\n".encode())
    kafka_access.apply(secure_stack.client_settings(), secure_stack.secrets)  # as `stack up` does once healthy
    assert AdminClient(kafka_as(secure_stack, "api").client_config()).list_topics(timeout=10).brokers
    stale = kafka_as(secure_stack, "api", sasl_password_file=None, sasl_password=SecretStr(old))
    assert "Authentication failed" in refusal(stale)


# -- the feature worker under ACLs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def feature_worker(secure_stack: LocalStack) -> Iterator[StreamsSettings]:
    """The stack's own ``streams`` program (``streamrec streams worker`` with the streams
    identity's files), with the Feast registry applied by the operator."""
    from features.store import apply, open_store

    with pytest.MonkeyPatch.context() as environment:
        for key, value in secure_stack.client_environment().items():  # the operator's shell
            environment.setenv(key, value)
        settings = StreamsSettings()
        apply(open_store(settings))
        secure_stack.start("streams")
        yield settings


def test_the_feature_worker_consumes_keeps_state_and_pushes_as_streams(
    secure_stack: LocalStack, feature_worker: StreamsSettings
) -> None:
    from features.store import open_store

    frame = movielens.load_interactions().iloc[:300]
    topics = secure_stack.topic_settings()
    report = replay(frame, ReplaySettings(kafka=kafka_as(secure_stack, "replay"), topics=topics), progress=False)
    assert (report.delivered, report.failed) == (len(frame), 0), report.summary()
    users = frame["user_id"].value_counts().index[:3].astype(str).tolist()
    want = {}
    for user in users:
        times = frame.loc[frame["user_id"].astype(str) == user, "event_time"]
        want[user] = int((times > times.max() - pd.Timedelta(hours=24)).sum())
    store = open_store(feature_worker)
    deadline = time.monotonic() + 60
    while True:
        got = store.get_online_features(
            features=["user_activity:count_24h"], entity_rows=[{"user_id": user} for user in users]
        ).to_dict()
        if dict(zip(got["user_id"], got["count_24h"], strict=True)) == want:
            break
        assert time.monotonic() < deadline, (got, want, secure_stack.logs("streams", 4000))
        time.sleep(1.0)
    # its table changelogs were created and written under its own prefix
    admin = AdminClient(kafka_as(secure_stack, "admin").client_config())
    changelog = f"{FEATURES_APP}-user_state-changelog"
    assert changelog in admin.list_topics(timeout=10).topics
    ends = Consumer({**kafka_as(secure_stack, "admin").client_config(), "group.id": "ends"})
    try:
        written = sum(ends.get_watermark_offsets(TopicPartition(changelog, p), timeout=10)[1] for p in range(4))
    finally:
        ends.close()
    assert written > 0
    assert "AUTHORIZATION" not in secure_stack.logs("streams", 200_000, from_start=True).upper()


def test_the_joiner_labels_as_joiner_and_the_evaluator_reads_the_labels(secure_stack: LocalStack) -> None:
    secure_stack.start("joiner")
    topics = secure_stack.topic_settings()
    now = datetime.now(UTC)
    request = f"r-{uuid.uuid4().hex[:8]}"
    shown = [ImpressionItem(item_id=item, score=1.0, position=n) for n, item in enumerate(["i0", "i1"])]
    impression = Impression(
        event_id=request, event_time=now, user_id="u1", request_id=request, arm="stable", model_version=1, items=shown
    )
    click = Click(event_id=f"c-{request}", event_time=now, user_id="u1", request_id=request, item_id="i1")
    # the API writes impressions; clicks come from the simulator, which runs as the operator
    for identity, topic, event in (("api", topics.impressions, impression), ("admin", topics.clicks, click)):
        producer = Producer(kafka_as(secure_stack, identity).client_config())
        producer.produce(topic, key=event.key(), value=event.to_bytes())
        assert producer.flush(30) == 0
    consumer = Consumer(
        {
            **kafka_as(secure_stack, "evaluator").client_config(),
            "group.id": "streamrec-evaluator",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    labels: dict[str, bool] = {}
    try:
        consumer.subscribe([topics.labeled])
        deadline = time.monotonic() + 45
        while len(labels) < len(shown):
            assert time.monotonic() < deadline, (labels, secure_stack.logs("joiner", 4000))
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            example = decode_event(message.value(), LabeledExample)
            if example.request_id == request:
                labels[example.item_id] = example.clicked
    finally:
        consumer.close()
    assert labels == {"i0": False, "i1": True}
    assert "AUTHORIZATION" not in secure_stack.logs("joiner", 200_000, from_start=True).upper()


def test_no_password_is_on_a_command_line_or_in_a_process_environment(
    secure_stack: LocalStack, feature_worker: StreamsSettings
) -> None:
    secrets = secure_stack.secrets
    assert secrets is not None
    passwords = {identity.kafka_password() for identity in secrets.identities.values()}
    stack_pids = {info["pid"] for info in secure_stack.status() if info["pid"]}
    assert len(stack_pids) >= 3  # the broker, the worker and the joiner at least
    checked = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            command_line = (proc / "cmdline").read_bytes()
            environment = (proc / "environ").read_bytes() if int(proc.name) in stack_pids else b""
        except OSError:
            continue  # gone, or not ours
        checked += 1
        for password in passwords:
            assert password.encode() not in command_line, f"a password on the command line of pid {proc.name}"
            assert password.encode() not in environment, f"a password in the environment of pid {proc.name}"
    assert checked > len(stack_pids)
    node_config = secure_stack.root / "kafka" / "server.properties"
    assert node_config.stat().st_mode & 0o777 == 0o600
    assert not (secrets.directory / "kafka-scram.args").exists()
    assert os.stat(secure_stack.root / "kafka").st_mode & 0o777 == 0o700
