"""Redis of a secure stack, for real: ``redis-server`` started from ``redis_server.redis_programs``
with the stack's secrets (TLS only, ACL users, protected mode), without Kafka or supervisord.

Negative: a plaintext client, a client trusting or presenting another CA's certificate, a wrong
password and the identities without Redis access are refused; each identity may run exactly what
``redis_server.REDIS_ACCESS`` grants. Positive: the feature writer's identity writes rows through
Feast (the worker's sink and a frame push) and the API's identity reads them through the API's own
store; a three-master cluster forms over TLS and serves the same identities. Every client is
configured the way the processes are, from ``identities.service_environment``.
"""

from __future__ import annotations

import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from feast.infra.online_stores.helpers import _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from typer.testing import CliRunner

from features import cli as features_cli
from features import store as feature_store
from features.errors import FeaturesError
from features.settings import FeaturesSettings, FeatureStoreTuning
from serving.api.server import open_feature_store
from serving.api.settings import ApiSettings
from serving.api.user_features import UserFeatureReader
from streamrec.core import contracts
from streamrec.core.attributes import user_model_inputs
from streamrec.core.settings import PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import redis_server
from streamrec.ops.stack.certs import LocalCA
from streamrec.ops.stack.identities import StackSecrets, service_environment
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_port_block, free_ports
from streamrec.ops.stack.programs import Program
from streams.pipeline import FeatureRow
from streams.settings import StreamsSettings
from streams.sink import FeastSink
from tests.support.tiny_model import TINY_SCHEMA

USERS = ["1", "2", "3"]
ITEMS = ["10", "11"]
READERS = ("api", "trainer")


@dataclass(frozen=True)
class SecureRedis:
    settings: StackSettings
    secrets: StackSecrets
    processes: list[subprocess.Popen[bytes]]
    log_dir: Path

    def redis_settings(self, name: str) -> RedisSettings:
        """Identity ``name``'s Redis settings as its process gets them (``service_environment``)."""
        prefix = "STREAMREC_REDIS__"
        variables = {
            key.removeprefix(prefix).lower(): value
            for key, value in service_environment(self.secrets, name).items()
            if key.startswith(prefix)
        }
        address = {
            "host": self.settings.redis.host,
            "port": self.settings.redis.port,
            "cluster": self.settings.redis.cluster,
        }
        return RedisSettings(**{**variables, **address})

    def client(self, name: str, port: int | None = None, **options: Any) -> redis.Redis:
        redis_settings = self.redis_settings(name)
        return redis.Redis(
            host=redis_settings.host,
            port=port or redis_settings.port,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
            **{**redis_settings.client_options(), **options},
        )


@contextmanager
def running(settings: StackSettings, secrets: StackSecrets, log_dir: Path) -> Iterator[SecureRedis]:
    """The stack's Redis programs as plain subprocesses, healthy (as ``admin``) before the body runs."""
    programs: list[Program] = redis_server.redis_programs(settings, secrets)
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for program in programs:
            with (log_dir / f"{program.name}.log").open("wb") as log:
                processes.append(subprocess.Popen(program.command, stdout=log, stderr=subprocess.STDOUT))  # noqa: S603
        deadline = time.monotonic() + 20
        for program, process in zip(programs, processes, strict=True):
            while program.healthy is not None and not program.healthy():
                log_text = (log_dir / f"{program.name}.log").read_text()
                assert process.poll() is None and time.monotonic() < deadline, f"{program.name}:\n{log_text}"
                time.sleep(0.1)
        redis_server.finish_start(settings, secrets)
        yield SecureRedis(settings, secrets, processes, log_dir)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRedis]:
    root = Path(tmp_path_factory.mktemp("redis-secure"))
    [port] = free_ports(1)
    settings = StackSettings(
        redis=RedisSettings(port=port), paths=PathSettings(state_dir=root), stack=StackTuning(secure=True)
    )
    secrets = LocalStack(settings).secrets  # where a secure stack keeps them: <state>/secrets
    assert secrets is not None
    with running(settings, secrets, root / "logs") as server:
        yield server


def feast_key(join_key: str, entity_id: str, project: str = "p") -> bytes:
    return _redis_key(project, EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity_id)]))


def plain_client(server: SecureRedis, **options: Any) -> redis.Redis:
    return redis.Redis(
        host=server.settings.redis.host,
        port=server.settings.redis.port,
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def test_a_plaintext_client_is_refused(secure: SecureRedis) -> None:
    with pytest.raises(redis.exceptions.ConnectionError) as refused:
        plain_client(secure).ping()
    assert not isinstance(refused.value, redis.exceptions.AuthenticationError)  # no TLS, no conversation at all
    admin = secure.redis_settings("admin").client_options()
    with pytest.raises(redis.exceptions.ConnectionError):  # the right password does not help without TLS
        plain_client(secure, username="admin", password=admin["password"]).ping()


def test_tls_without_credentials_or_as_the_default_user_is_refused(secure: SecureRedis) -> None:
    tls = {"ssl": True, "ssl_ca_certs": str(secure.secrets.ca_file)}
    with pytest.raises(redis.exceptions.AuthenticationError):
        plain_client(secure, **tls).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        plain_client(secure, **tls, username="default", password="x").ping()  # noqa: S106 -- a wrong one


def test_a_certificate_of_another_ca_is_refused_either_way(secure: SecureRedis, tmp_path: Path) -> None:
    other = LocalCA.load_or_create(tmp_path / "other-ca")
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        secure.client("admin", ssl_ca_certs=str(other.ca_file)).ping()  # the client does not trust the server
    stranger = other.issue("admin")  # the server does not trust a client certificate it is shown
    with pytest.raises(redis.exceptions.ConnectionError):
        secure.client("admin", ssl_certfile=str(stranger.cert_file), ssl_keyfile=str(stranger.key_file)).ping()
    assert secure.client("admin").ping()


def test_a_wrong_password_and_the_identities_without_redis_access_are_refused(secure: SecureRedis) -> None:
    with pytest.raises(redis.exceptions.AuthenticationError):
        secure.client("api", password="not-the-password").ping()  # noqa: S106 -- a wrong one
    without = [name for name, rules in redis_server.REDIS_ACCESS.items() if rules is None]
    assert sorted(without) == ["evaluator", "joiner", "model-server", "replay", "skew"]
    for name in without:
        with pytest.raises(redis.exceptions.AuthenticationError):
            secure.client(name).ping()  # its own password: the user is off


def allowed(client: redis.Redis, command: str, *args: object) -> bool:
    """Whether ``client``'s user may run ``command`` (a redis-py method) with ``args``."""
    try:
        getattr(client, command)(*args)
    except redis.exceptions.NoPermissionError:
        return False
    return True


def test_each_identity_may_run_what_its_acl_grants_and_nothing_more(secure: SecureRedis) -> None:
    user_key, item_key, other_key = feast_key("user_id", "42"), feast_key("item_id", "7"), b"streamrec:other"
    admin, streams = secure.client("admin"), secure.client("streams")
    assert allowed(admin, "set", other_key, "1") and allowed(admin, "config_get", "appendfsync")
    assert streams.hset(user_key, "f", "v") == 1 and streams.hset(item_key, "f", "v") == 1
    assert streams.hmget(user_key, ["f"]) == [b"v"] and streams.info("server")["run_id"]
    assert allowed(streams, "expire", item_key, 3600)
    refused_to_streams = [
        ("set", other_key, "2"),
        ("get", other_key),
        ("flushall",),
        ("keys", "*"),
        ("config_get", "*"),
        ("acl_list",),
    ]
    assert [args for args in refused_to_streams if allowed(streams, *args)] == []
    refused_to_readers = [
        ("hset", user_key, "f", "w"),
        ("delete", user_key),
        ("expire", user_key, 1),
        ("get", other_key),
        ("info",),
        ("flushdb",),
    ]
    for name in READERS:
        reader = secure.client(name)
        assert reader.hmget(user_key, ["f"]) == [b"v"] and reader.hmget(item_key, ["f"]) == [b"v"]
        assert [args for args in refused_to_readers if allowed(reader, *args)] == [], name
    assert admin.hmget(user_key, ["f"]) == [b"v"] and admin.get(other_key) == b"1"


def test_protected_mode_is_on_and_no_password_is_kept_in_plaintext(secure: SecureRedis) -> None:
    admin = secure.client("admin")
    assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
    assert admin.config_get("port") == {"port": "0"} and admin.config_get("requirepass") == {"requirepass": ""}
    passwords = [identity.redis_password() for identity in secure.secrets.identities.values()]
    listed = "\n".join(admin.acl_list())
    assert "user default off" in listed and not any(password in listed for password in passwords)
    acl_file = redis_server.acl_file(secure.secrets)
    assert not any(password in acl_file.read_text() for password in passwords)
    for path in [secure.secrets.directory, *secure.secrets.directory.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    for process in secure.processes:  # what `ps` shows (Redis retitles itself; its arguments hold paths only)
        shown = [Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(), " ".join(map(str, process.args))]
        assert not any(password in text for password in passwords for text in shown)
    log = "".join(path.read_text() for path in secure.log_dir.glob("*.log"))
    assert not any(password in log for password in passwords)


def features_of(settings_class: type[Any], server: SecureRedis, name: str, data: Path, project: str) -> Any:
    return settings_class(
        redis=server.redis_settings(name),
        paths=PathSettings(state_dir=data),
        features=FeatureStoreTuning(project=project),
    )


def test_the_feature_writer_writes_through_feast_and_the_api_reads_through_feast(
    secure: SecureRedis, tmp_path: Path
) -> None:
    project = f"s{uuid.uuid4().hex[:8]}"
    admin = features_of(FeaturesSettings, secure, "admin", tmp_path, project)
    users = pd.DataFrame({"user_id": USERS, "segment": ["a", "b", "c"], "tenure_days": [1.0, 2.0, 3.0]})
    items = pd.DataFrame({"item_id": ITEMS, "tags": [["x"], ["y"]]})
    feature_store.setup_dataset(feature_store.open_store(admin), "secure-tiny", TINY_SCHEMA, users, items)

    streams = features_of(StreamsSettings, secure, "streams", tmp_path, project)
    sink = FeastSink(streams, TINY_SCHEMA)  # the worker's path: RowWriter, then INFO for the store's run
    sink.warm_up()
    now_us = int(time.time()) * 1_000_000
    activity = {"recent_items": ["10", "11"], "count_1h": 2, "count_24h": 5, "last_event_ts": now_us // 1_000_000}
    sink.push("user_activity", [FeatureRow("2", activity, now_us)])
    assert sink.store_epoch() == secure.client("admin").info("server")["run_id"]
    reader_sink = FeastSink(features_of(StreamsSettings, secure, "api", tmp_path, project), TINY_SCHEMA)
    reader_sink.warm_up()
    with pytest.raises(FeaturesError, match="'api' may not run INFO.*grant it \\+info"):
        reader_sink.store_epoch()  # an ACL that would hide restarts is an error, not "no answer"
    stats = pd.DataFrame(
        {
            "item_id": ITEMS,
            "count_1h": [1, 2],
            "count_24h": [3, 4],
            "trending_score": [0.5, 1.5],
            "event_timestamp": [pd.Timestamp.now(tz="UTC").floor("s")] * 2,
        }
    )
    assert feature_store.push_item_stats(feature_store.open_store(streams), stats, offline=False) == 2

    api = features_of(ApiSettings, secure, "api", tmp_path, project)
    api_store = open_feature_store(api)  # the API's own store: its timeouts added to the credentials
    reader = UserFeatureReader(api_store, inputs=user_model_inputs(TINY_SCHEMA), max_age_s=3600.0)
    read = reader.read("2")
    assert read.known and read.recent_items == ["10", "11"] and read.attributes["segment"] == "b"
    frame = feature_store.read_online(api_store, contracts.ITEM_FEATURE_SERVICE, ITEMS)
    assert list(frame["count_24h"]) == [3, 4] and [list(tags) for tags in frame["tags"]] == [["x"], ["y"]]
    newer = stats.assign(event_timestamp=stats["event_timestamp"] + pd.Timedelta(seconds=1))  # Feast skips older
    with pytest.raises(redis.exceptions.NoPermissionError):
        feature_store.push_item_stats(api_store, newer, offline=False)
    assert list(feature_store.read_online(api_store, contracts.ITEM_FEATURE_SERVICE, ITEMS)["count_24h"]) == [3, 4]

    # `streamrec features show` from the operator's shell (`stack env`: admin); as the API it is told why not
    env = {
        **service_environment(secure.secrets, "admin"),
        "STREAMREC_REDIS__PORT": str(secure.settings.redis.port),
        "STREAMREC_PATHS__STATE_DIR": str(tmp_path),
        "STREAMREC_FEATURES__PROJECT": project,
    }
    shown = CliRunner().invoke(features_cli.app, ["show", "2"], env=env)
    assert shown.exit_code == 0 and "recent_items: ['10', '11']" in shown.output, shown.output
    as_api = {**env, **service_environment(secure.secrets, "api")}
    refused = CliRunner().invoke(features_cli.app, ["show", "2"], env=as_api)
    assert isinstance(refused.exception, FeaturesError) and "refused user 'api'" in str(refused.exception)


def test_a_secure_cluster_forms_over_tls_and_serves_the_writer_and_the_readers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    nodes = 3
    base = free_port_block(2 * nodes)  # client ports, then bus ports
    settings = StackSettings(
        redis=RedisSettings(port=base, cluster=True),
        paths=PathSettings(state_dir=Path(tmp_path_factory.mktemp("redis-secure-cluster"))),
        stack=StackTuning(secure=True, redis_cluster_nodes=nodes, redis_cluster_bus_port=base + nodes),
    )
    secrets = LocalStack(settings).secrets
    assert secrets is not None
    with running(settings, secrets, settings.paths.state_dir / "logs") as cluster:
        admin = cluster.client("admin")
        assert admin.cluster("INFO")["cluster_state"] == "ok"
        assert admin.config_get("tls-cluster") == {"tls-cluster": "yes"}
        options = cluster.redis_settings("streams").client_options()
        writer = RedisCluster(host=settings.redis.host, port=base, **options)
        keys = [feast_key("user_id", str(n)) for n in range(30)]
        for key in keys:
            writer.hset(key, "f", "v")
        assert len(writer.info("server", target_nodes=RedisCluster.PRIMARIES)) == nodes  # the sink's epoch read
        with pytest.raises(redis.exceptions.NoPermissionError):
            writer.set("streamrec:other", "1")
        reader = RedisCluster(host=settings.redis.host, port=base, **cluster.redis_settings("api").client_options())
        assert [reader.hmget(key, ["f"]) for key in keys] == [[b"v"]] * len(keys)
        with pytest.raises(redis.exceptions.NoPermissionError):
            reader.hset(keys[0], "f", "w")
        spread = [cluster.client("admin", port=node.port).dbsize() for node in redis_server.cluster_nodes(settings)]
        assert all(count > 0 for count in spread), spread
        writer.close()
        reader.close()
