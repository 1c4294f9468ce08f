"""The Redis Cluster option without a Redis: how the feature store's configuration and the stack's
programs are rendered from settings, and the port checks. The cluster itself runs in
``tests/integration/test_redis_cluster.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig, RedisType
from pydantic import ValidationError

from features.cli import render_feature_store_yaml
from features.settings import FeaturesSettings
from features.store import redis_connection_string, repo_config
from streamrec.core.settings import PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import redis_server


def features_settings(tmp_path: Path, **redis: object) -> FeaturesSettings:
    return FeaturesSettings(paths=PathSettings(state_dir=tmp_path), redis=RedisSettings(**redis))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("redis", "expected"),
    [
        ({"host": "r.internal", "port": 7000, "db": 2}, "r.internal:7000,db=2"),
        ({"port": 7000, "password": "s3cret"}, "127.0.0.1:7000,db=0,password=s3cret"),
        ({"host": "r.internal", "port": 7000, "cluster": True}, "r.internal:7000"),
        ({"port": 7000, "cluster": True, "password": "s3cret"}, "127.0.0.1:7000,password=s3cret"),
    ],
    ids=["plain", "plain-password", "cluster", "cluster-password"],
)
def test_the_connection_string_has_a_db_only_outside_a_cluster(
    tmp_path: Path, redis: dict[str, object], expected: str
) -> None:
    assert redis_connection_string(features_settings(tmp_path, **redis)) == expected


def test_a_cluster_is_feasts_redis_cluster_store_whose_client_gets_no_db(tmp_path: Path) -> None:
    config = repo_config(features_settings(tmp_path, port=7000, cluster=True)).online_store
    assert isinstance(config, RedisOnlineStoreConfig) and config.redis_type == RedisType.redis_cluster
    # what Feast hands RedisCluster(...): the startup node, and no `db` (RedisCluster refuses one)
    nodes, kwargs = RedisOnlineStore._parse_connection_string(config.connection_string)
    assert (nodes, kwargs) == ([{"host": "127.0.0.1", "port": "7000"}], {})
    plain = repo_config(features_settings(tmp_path, port=7000)).online_store
    assert isinstance(plain, RedisOnlineStoreConfig) and plain.redis_type == RedisType.redis


def test_the_feast_cli_yaml_names_the_cluster_and_keeps_an_odd_password_whole(tmp_path: Path) -> None:
    settings = features_settings(tmp_path, host="r.internal", port=7000, cluster=True, password='p:"x')  # noqa: S106
    online = yaml.safe_load(render_feature_store_yaml(settings))["online_store"]
    assert online == {
        "type": "redis",
        "connection_string": 'r.internal:7000,password=p:"x',
        "redis_type": "redis_cluster",
    }


def stack_settings(tmp_path: Path, redis_port: int, bus_port: int, *, cluster: bool = True) -> StackSettings:
    return StackSettings(
        redis=RedisSettings(port=redis_port, cluster=cluster),
        paths=PathSettings(state_dir=tmp_path),
        stack=StackTuning(redis_cluster_bus_port=bus_port, redis_appendfsync="always"),
    )


@pytest.mark.parametrize(
    ("redis_port", "bus_port"),
    [(65534, 16379), (7000, 65534), (7000, 7002)],
    ids=["client-ports-past-65535", "bus-ports-past-65535", "overlapping"],
)
def test_cluster_ports_past_65535_or_overlapping_are_refused_naming_the_settings(
    tmp_path: Path, redis_port: int, bus_port: int
) -> None:
    with pytest.raises(ValidationError, match=r"redis\.port or stack\.redis_cluster_bus_port"):
        stack_settings(tmp_path, redis_port, bus_port)
    stack_settings(tmp_path, redis_port, bus_port, cluster=False)  # one server needs only redis.port


def test_the_cluster_nodes_split_the_slots_and_have_their_own_ports_and_folders(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, 7000, 17000)
    # 16384 slots in thirds: 5461, 5461 and 5462 slots
    assert [(n.name, n.port, n.bus_port, n.first_slot, n.last_slot) for n in redis_server.cluster_nodes(settings)] == [
        ("redis-1", 7000, 17000, 0, 5460),
        ("redis-2", 7001, 17001, 5461, 10921),
        ("redis-3", 7002, 17002, 10922, 16383),
    ]
    programs = redis_server.redis_programs(settings)
    assert [program.name for program in programs] == ["redis-1", "redis-2", "redis-3"]
    for n, program in enumerate(programs):
        options = dict(zip(program.command[1::2], program.command[2::2], strict=True))
        data_dir = tmp_path / f"redis-{n + 1}"
        assert options == {
            "--port": str(7000 + n),
            "--bind": "127.0.0.1",
            "--dir": str(data_dir),
            "--save": "",
            "--appendonly": "yes",
            "--appendfsync": "always",
            "--protected-mode": "no",
            "--cluster-enabled": "yes",
            "--cluster-config-file": str(data_dir / "nodes.conf"),
            "--cluster-port": str(17000 + n),
            "--cluster-require-full-coverage": "no",
        }
        assert data_dir.is_dir()


def test_one_server_stays_the_program_named_redis(tmp_path: Path) -> None:
    [program] = redis_server.redis_programs(stack_settings(tmp_path, 7000, 17000, cluster=False))
    assert program.name == "redis" and "--cluster-enabled" not in program.command
    redis_server.finish_start(stack_settings(tmp_path, 7000, 17000, cluster=False))  # nothing to form, no Redis needed
