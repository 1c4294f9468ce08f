"""Who the secure stack's Kafka lets in and what each may do: one SCRAM principal per service,
each allowed only its own topics and consumer group; KRaft's ``StandardAuthorizer`` denies the rest.

:func:`service_acls` is the whole table, derived from settings rather than written out: the
shared topic names (``TopicSettings``), each Faust app's id (its consumer group, and the prefix
``<app id>-`` of the topics Faust creates for it: table changelogs and the leader topic), the
feature worker's by-item repartition topic, the trainer's source topic and group and the
evaluator's group. ``admin`` (the operator: topic creation, these ACLs) and the Kafka nodes are
super users and need no row; the model server gets none, it never talks to Kafka.

READ and WRITE imply DESCRIBE, and since Kafka 3.0 WRITE on any topic also allows the
idempotent producer (``IDEMPOTENT_WRITE``), so the table needs nothing on the cluster. CREATE is
granted only where a service creates topics itself: the Faust apps' internal topics.

:func:`apply` runs as admin once the stack is healthy: :func:`sync_credentials` sets every
service's SCRAM credential from its password file (the storage was formatted with them, but an
identity may have been added or a password file replaced since), and :func:`sync_acls` makes the
brokers hold exactly the table for the project's identities (missing bindings created, stale
ones deleted).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, re-exported without __all__
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

from streamrec.core.errors import StackError
from streamrec.core.settings import CommonSettings, KafkaSettings
from streamrec.ops.stack.identities import IDENTITIES, StackSecrets

Operation = Literal["READ", "WRITE", "CREATE"]
# AclBindingFilter matches any value where it gets None (its docs), though its hints say str.
_ANY: Any = None


@dataclass(frozen=True)
class Grant:
    """``identity`` may do ``operations`` on the topic or group ``name`` (with ``prefixed``, on
    every topic or group whose name starts with ``name``)."""

    identity: str
    resource: Literal["topic", "group"]
    name: str
    operations: tuple[Operation, ...]
    prefixed: bool = False

    def bindings(self) -> list[AclBinding]:
        return [
            AclBinding(
                ResourceType.TOPIC if self.resource == "topic" else ResourceType.GROUP,
                self.name,
                ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL,
                f"User:{self.identity}",
                "*",
                AclOperation[operation],
                AclPermissionType.ALLOW,
            )
            for operation in self.operations
        ]

    def describe(self) -> str:
        """One line of the README's table: ``streams: READ topic streamrec.interactions``."""
        pattern = f"{self.name}*" if self.prefixed else self.name
        return f"{self.identity}: {'+'.join(self.operations)} {self.resource} {pattern}"


def _faust_app(identity: str, app_id: str) -> list[Grant]:
    """A Faust app's own group and the topics Faust creates under its id."""
    return [
        Grant(identity, "topic", f"{app_id}-", ("READ", "WRITE", "CREATE"), prefixed=True),
        Grant(identity, "group", app_id, ("READ",)),
    ]


def service_acls(settings: CommonSettings) -> tuple[Grant, ...]:
    """The ACL table for ``settings.topics`` and the services' own names, read from the
    environment the stack hands its programs (``STREAMREC_STREAMS__APP_ID`` and so on)."""
    from features.skew_settings import SkewSettings
    from online_trainer.settings import TrainerSettings
    from serving.rollout.settings import EvaluatorSettings
    from streams.joiner_settings import JoinerSettings
    from streams.settings import StreamsSettings

    topics = settings.topics
    streams = StreamsSettings(topics=topics)
    joiner = JoinerSettings(topics=topics).joiner
    trainer = TrainerSettings(topics=topics)
    evaluator = EvaluatorSettings(topics=topics).evaluator
    return (
        Grant("replay", "topic", topics.interactions, ("WRITE",)),
        Grant("streams", "topic", topics.interactions, ("READ",)),
        Grant("streams", "topic", topics.deadletter, ("WRITE",)),
        # the by-item repartition topic is internal to the worker group, but not under its id
        Grant("streams", "topic", streams.by_item_topic, ("READ", "WRITE", "CREATE")),
        *_faust_app("streams", streams.streams.app_id),
        Grant("joiner", "topic", topics.impressions, ("READ",)),
        Grant("joiner", "topic", topics.clicks, ("READ",)),
        Grant("joiner", "topic", topics.labeled, ("WRITE",)),
        Grant("joiner", "topic", topics.deadletter, ("WRITE",)),
        *_faust_app("joiner", joiner.app_id),
        Grant("api", "topic", topics.impressions, ("WRITE",)),
        Grant("trainer", "topic", trainer.source_topic, ("READ",)),
        Grant("trainer", "group", trainer.trainer.group_id, ("READ",)),
        # the off-policy gate and the ranking model read the recent labeled examples (by offset; the
        # client still looks its group's coordinator up)
        *([Grant("trainer", "topic", topics.labeled, ("READ",))] if trainer.source_topic != topics.labeled else []),
        Grant("trainer", "group", trainer.trainer.labeled_reader_group_id, ("READ",)),
        Grant("evaluator", "topic", topics.labeled, ("READ",)),
        Grant("evaluator", "group", evaluator.group_id, ("READ",)),
        Grant("skew", "topic", topics.impressions, ("READ",)),
        Grant("skew", "group", SkewSettings(topics=topics).skew.group_id, ("READ",)),
    )


def _key(binding: AclBinding) -> tuple[Any, ...]:
    """The binding's fields, in ``AclBindingFilter``'s argument order."""
    return (
        binding.restype,
        binding.name,
        binding.resource_pattern_type,
        binding.principal,
        binding.host,
        binding.operation,
        binding.permission_type,
    )


def _exactly(binding: AclBinding) -> AclBindingFilter:
    """A filter that matches (and so deletes) exactly ``binding``."""
    return AclBindingFilter(*_key(binding))


def sync_acls(admin_kafka: KafkaSettings, grants: Iterable[Grant], timeout_s: float = 30.0) -> None:
    """Make the brokers' ACLs for the project's identities exactly ``grants``: create the
    missing bindings and delete the others (a service's name or topic changed since the last
    start). Runs as a super user (``admin_kafka``); ACLs of other principals are left alone."""
    admin = AdminClient(admin_kafka.client_config())
    wanted = {_key(binding): binding for grant in grants for binding in grant.bindings()}
    principals = {f"User:{identity}" for identity in IDENTITIES}
    try:
        existing = admin.describe_acls(
            AclBindingFilter(
                ResourceType.ANY, _ANY, ResourcePatternType.ANY, _ANY, _ANY, AclOperation.ANY, AclPermissionType.ANY
            ),
            request_timeout=timeout_s,
        ).result(timeout=timeout_s)
        have = {_key(binding): binding for binding in existing if binding.principal in principals}
        stale = [_exactly(binding) for key, binding in have.items() if key not in wanted]
        missing = [binding for key, binding in wanted.items() if key not in have]
        for future in (admin.delete_acls(stale, request_timeout=timeout_s) if stale else {}).values():
            future.result(timeout=timeout_s)
        for future in (admin.create_acls(missing, request_timeout=timeout_s) if missing else {}).values():
            future.result(timeout=timeout_s)
    except KafkaException as exc:
        raise StackError(
            f"could not set the Kafka ACLs as {admin_kafka.sasl_username} at {admin_kafka.bootstrap_servers}: "
            f"{exc.args[0]}"
        ) from exc


# Kafka's default for SCRAM-SHA-512, as kafka-storage --add-scram uses.
SCRAM_ITERATIONS = 4096


def sync_credentials(admin_kafka: KafkaSettings, secrets: StackSecrets, timeout_s: float = 30.0) -> None:
    """Set every identity's SCRAM-SHA-512 credential but the operator's from its password file
    (the operator's is the nodes' own login too, fixed when the storage is formatted)."""
    admin = AdminClient(admin_kafka.client_config())
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(
            name,
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS),
            identity.kafka_password().encode(),
        )
        for name, identity in secrets.identities.items()
        if f"User:{name}" != f"User:{admin_kafka.sasl_username}"
    ]
    try:
        for future in admin.alter_user_scram_credentials(upserts, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)
    except KafkaException as exc:
        raise StackError(
            f"could not set the SCRAM credentials as {admin_kafka.sasl_username} at {admin_kafka.bootstrap_servers}: "
            f"{exc.args[0]}"
        ) from exc


def apply(client: CommonSettings, secrets: StackSecrets) -> None:
    """Credentials, then ACLs, as the operator (``client``'s Kafka principal), for ``client``'s
    topic layout and the services' settings in this process's environment."""
    sync_credentials(client.kafka, secrets)
    sync_acls(client.kafka, service_acls(client))
