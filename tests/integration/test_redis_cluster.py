"""The local stack with ``redis.cluster`` on: three Redis masters formed by ``LocalStack.up``, the
feature store on them through Feast's ``redis_cluster`` online store (the worker's row writer, a
frame push, set-up's materialize and clear), the API's user-feature and trending reads, a master
stopped (the others keep serving) and a master SIGKILLed and restarted from its append-only file.

One stack serves the module (its own Kafka and Redis nodes on free ports, beside the session's);
the outage tests run last, in file order, and leave the cluster whole again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import redis
from feast import FeatureStore
from redis.cluster import RedisCluster

from features import feast_internals
from features import store as feature_store
from features.push import RowWriter
from features.settings import FeatureStoreTuning
from features.views import user_activity_view
from serving.api.metrics import ApiMetrics
from serving.api.server import open_feature_store
from serving.api.settings import ApiSettings
from serving.api.trending import TrendingItems
from serving.api.user_features import UserFeatureReader, UserFeatures
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, user_model_inputs
from streamrec.core.settings import KafkaSettings, PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import redis_server
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_port_block, free_ports
from tests.support.tiny_model import TINY_SCHEMA

NODES = ("redis-1", "redis-2", "redis-3")
# Enough entities that each master holds some (checked below, not assumed).
USERS = [str(n) for n in range(1, 31)]
ITEMS = [str(n) for n in range(1, 21)]
INPUTS = user_model_inputs(TINY_SCHEMA)


def segment(user_id: str) -> str:
    return ("gold", "silver", "new")[int(user_id) % 3]


def recent(user_id: str) -> list[str]:
    return [str(int(user_id) % 20 + 1), str((int(user_id) + 7) % 20 + 1)]


@dataclass(frozen=True)
class ActivityRow:
    """A user_activity row as the streams worker hands it to ``RowWriter``."""

    entity_id: str
    features: dict[str, object]
    version_us: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    redis_base = free_port_block(2 * len(NODES))  # client ports, then bus ports
    kafka_port, controller_port, supervisor_port = [
        port for port in free_ports(3 + 2 * len(NODES)) if not redis_base <= port < redis_base + 2 * len(NODES)
    ][:3]
    settings = StackSettings(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}"),
        redis=RedisSettings(port=redis_base, cluster=True),
        paths=PathSettings(state_dir=Path(tmp_path_factory.mktemp("cluster-stack"))),
        stack=StackTuning(
            kafka_port=kafka_port,
            kafka_controller_port=controller_port,
            supervisor_port=supervisor_port,
            redis_cluster_bus_port=redis_base + len(NODES),
        ),
    )
    local = LocalStack(settings)
    local.up()
    try:
        yield local
    finally:
        local.down()


@pytest.fixture(scope="module")
def settings(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> ApiSettings:
    return ApiSettings(
        kafka=stack.settings.kafka,
        redis=stack.settings.redis,
        paths=PathSettings(state_dir=Path(tmp_path_factory.mktemp("cluster-features"))),
        features=FeatureStoreTuning(project=f"c{uuid.uuid4().hex[:8]}"),
    )


@pytest.fixture(scope="module")
def now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").floor("s")


@pytest.fixture(scope="module")
def store(settings: ApiSettings, now: pd.Timestamp) -> FeatureStore:
    """Set up for the tiny schema (materialize on the cluster); each user's activity through the
    worker's ``RowWriter``, item stats through a frame push."""
    users = pd.DataFrame(
        {"user_id": USERS, "segment": [segment(u) for u in USERS], "tenure_days": [float(u) for u in USERS]}
    )
    items = pd.DataFrame({"item_id": ITEMS, "tags": [[f"tag-{int(item) % 3}"] for item in ITEMS]})
    opened = feature_store.open_store(settings)
    report = feature_store.setup_dataset(opened, "cluster-tiny", TINY_SCHEMA, users, items)
    assert report.profile_rows == {"user_profile": len(USERS), "item_profile": len(ITEMS)}
    version_us = int(now.timestamp()) * 1_000_000
    rows = [
        ActivityRow(
            user,
            {"recent_items": recent(user), "count_1h": int(user), "count_24h": 2 * int(user), "last_event_ts": 0},
            version_us,
        )
        for user in USERS
    ]
    writer = RowWriter(opened, user_activity_view(TINY_SCHEMA))
    assert writer.write(rows, online=True, offline=False) == len(USERS)
    stats = pd.DataFrame(
        {
            "item_id": ITEMS,
            "count_1h": [int(item) for item in ITEMS],
            "count_24h": [int(item) for item in ITEMS],
            "trending_score": [float(int(item) % 7) + int(item) / 100 for item in ITEMS],
            "event_timestamp": [now] * len(ITEMS),
        }
    )
    assert feature_store.push_item_stats(opened, stats) == len(ITEMS)
    return opened


def node_client(stack: LocalStack, name: str) -> redis.Redis:
    node = next(node for node in redis_server.cluster_nodes(stack.settings) if node.name == name)
    return redis.Redis(host=stack.settings.redis.host, port=node.port)


def node_ids(stack: LocalStack) -> dict[str, object]:
    ids = {}
    for name in NODES:
        with node_client(stack, name) as client:
            ids[name] = client.cluster("MYID")
    return ids


def project_keys(stack: LocalStack, project: str) -> dict[str, int]:
    """How many of the project's Feast keys each master holds (Feast ends every key with the project)."""
    counts = {}
    for name in NODES:
        with node_client(stack, name) as client:
            counts[name] = sum(1 for _ in client.scan_iter(match=b"*" + project.encode()))
    return counts


def expected_user(user_id: str) -> UserFeatures:
    return UserFeatures(
        user_id,
        {"segment": segment(user_id), "tenure_days": float(user_id)},
        recent(user_id),
        {"count_1h": int(user_id), "count_24h": 2 * int(user_id)},
        found_views=frozenset({contracts.USER_PROFILE_VIEW, contracts.USER_ACTIVITY_VIEW}),
    )


def online_users(store: FeatureStore) -> list[tuple[str, str, int, list[str]]]:
    frame = feature_store.read_online(store, contracts.USER_FEATURE_SERVICE, USERS)
    return [
        (row.user_id, row.segment, int(row.count_1h), list(row.recent_items)) for row in frame.itertuples(index=False)
    ]


def expected_online_users() -> list[tuple[str, str, int, list[str]]]:
    return [(user, segment(user), int(user), recent(user)) for user in USERS]


def test_stack_up_forms_three_masters_that_serve_every_slot(stack: LocalStack) -> None:
    assert stack.health() == {"kafka": True, **dict.fromkeys(NODES, True)}
    nodes = redis_server.cluster_nodes(stack.settings)
    client = RedisCluster(host=stack.settings.redis.host, port=stack.settings.redis.port)
    info = client.cluster_info()
    assert (info["cluster_state"], info["cluster_size"], info["cluster_slots_ok"]) == ("ok", "3", "16384")
    served = sorted((first, last, int(node["primary"][1])) for (first, last), node in client.cluster_slots().items())
    assert served == [  # 16384 slots in three contiguous ranges, one per master, none with replicas
        (0, 5460, nodes[0].port),
        (5461, 10921, nodes[1].port),
        (10922, 16383, nodes[2].port),
    ]
    ids = node_ids(stack)
    redis_server.finish_start(stack.settings)  # again on a whole cluster: nothing changes
    assert node_ids(stack) == ids
    for node in nodes:
        data_dir = stack.settings.paths.state_dir / node.name
        assert (data_dir / "nodes.conf").is_file() and (data_dir / "appendonlydir").is_dir()
    client.close()


def test_rows_spread_over_every_master_and_read_back_through_feast(
    stack: LocalStack, store: FeatureStore, settings: ApiSettings
) -> None:
    keys = project_keys(stack, settings.features.project)
    assert sum(keys.values()) == len(USERS) + len(ITEMS)  # one hash per entity, every view's fields in it
    assert all(count > 0 for count in keys.values()), keys
    assert online_users(store) == expected_online_users()
    items = feature_store.read_online(store, contracts.ITEM_FEATURE_SERVICE, ITEMS)
    assert list(items["count_24h"]) == [int(item) for item in ITEMS]
    assert [list(tags) for tags in items["tags"]] == [[f"tag-{int(item) % 3}"] for item in ITEMS]


def test_the_api_reads_user_features_and_trending_from_the_cluster(store: FeatureStore, settings: ApiSettings) -> None:
    api_store = open_feature_store(settings)
    client = feast_internals.online_redis_client(api_store)
    assert isinstance(client, RedisCluster) and client.retry.get_retries() == 0  # a timeout is final
    reader = UserFeatureReader(api_store, inputs=INPUTS, max_age_s=settings.feature_max_age_s)
    assert reader._hmget is not None  # noqa: SLF001 - the one-HMGET path works on a cluster too
    assert [reader.read(user) for user in USERS] == [expected_user(user) for user in USERS]
    assert not reader.read("no-such-user").known
    trending = TrendingItems(api_store, interval_s=60, max_age_s=settings.feature_max_age_s, metrics=ApiMetrics())
    snapshot = trending.refresh()
    by_score = sorted(ITEMS, key=lambda item: (-(int(item) % 7 + int(item) / 100), ITEMS.index(item)))
    assert list(snapshot.item_ids) == by_score


def test_setup_for_another_dataset_clears_the_rows_on_every_master(stack: LocalStack, settings: ApiSettings) -> None:
    """Switching datasets deletes every row of the project: Feast scans each master for it."""
    other = settings.model_copy(update={"features": FeatureStoreTuning(project=f"o{uuid.uuid4().hex[:8]}")})
    switching = feature_store.open_store(other)
    users = pd.DataFrame({"user_id": USERS, "segment": ["x"] * len(USERS), "tenure_days": [1.0] * len(USERS)})
    items = pd.DataFrame({"item_id": ITEMS, "tags": [["t"]] * len(ITEMS)})
    feature_store.setup_dataset(switching, "first", TINY_SCHEMA, users, items)
    assert all(count > 0 for count in project_keys(stack, other.features.project).values())
    feature_store.setup_dataset(switching, "second", AttributeSchema(), None, None)
    assert project_keys(stack, other.features.project) == dict.fromkeys(NODES, 0)


def test_with_one_master_stopped_the_others_keep_serving_their_users(
    stack: LocalStack, store: FeatureStore, settings: ApiSettings
) -> None:
    api_store = open_feature_store(settings)
    reader = UserFeatureReader(api_store, inputs=INPUTS, max_age_s=settings.feature_max_age_s)
    stack.stop("redis-2")
    try:
        answered, failed = [], []
        for user in USERS:
            try:
                assert reader.read(user) == expected_user(user)
                answered.append(user)
            except redis.exceptions.ConnectionError:
                failed.append(user)
    finally:
        stack.start("redis-2")
    assert answered and failed  # a third of the key space is offline, not all of it
    assert [reader.read(user) for user in failed] == [expected_user(user) for user in failed]


def test_a_master_killed_and_restarted_keeps_its_rows(
    stack: LocalStack, store: FeatureStore, settings: ApiSettings
) -> None:
    with node_client(stack, "redis-3") as client:
        held = client.dbsize()
    assert held > 0
    time.sleep(1.5)  # appendfsync everysec: on disk within a second
    pid = next(info["pid"] for info in stack.status() if info["name"] == "redis-3")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # supervisord restarts it; it replays its append-only file
    while not any(
        info["name"] == "redis-3" and info["statename"] == "RUNNING" and info["pid"] not in (0, pid)
        for info in stack.status()
    ):
        assert time.monotonic() < deadline, f"redis-3 not restarted: {stack.status()}"
        time.sleep(0.2)
    stack.wait_healthy(30, ["redis-3"])  # healthy: answers and sees the cluster whole again
    with node_client(stack, "redis-3") as client:
        assert client.dbsize() == held
    assert online_users(store) == expected_online_users()
    reader = UserFeatureReader(open_feature_store(settings), inputs=INPUTS, max_age_s=settings.feature_max_age_s)
    assert [reader.read(user) for user in USERS] == [expected_user(user) for user in USERS]
