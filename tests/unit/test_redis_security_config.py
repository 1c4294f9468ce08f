"""The secure stack's Redis without a Redis: the ACL file rendered from the identities, the
``redis-server`` options of a TLS-only server, and the credentials Feast's connection string
carries. The servers themselves run in ``tests/integration/test_redis_security.py``."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import stat
from pathlib import Path

import pytest
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _redis_key
from feast.infra.online_stores.redis import RedisOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from pydantic import SecretStr, ValidationError

from features.errors import FeaturesError
from features.settings import FeaturesSettings
from features.store import redis_connection_string
from streamrec.core import contracts
from streamrec.core.errors import StackError
from streamrec.core.settings import PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import redis_server
from streamrec.ops.stack.identities import IDENTITIES, StackSecrets, service_environment


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> StackSecrets:
    return StackSecrets.ensure(Path(tmp_path_factory.mktemp("secrets")))


def settings_of(tmp_path: Path, *, secure: bool, cluster: bool = False) -> StackSettings:
    return StackSettings(
        redis=RedisSettings(port=7000, cluster=cluster),
        paths=PathSettings(state_dir=tmp_path),
        stack=StackTuning(secure=secure, redis_cluster_bus_port=17000),
    )


def redis_env_settings(secrets: StackSecrets, name: str, **redis: object) -> RedisSettings:
    """An identity's ``RedisSettings`` as its process gets them: from ``service_environment``."""
    prefix = "STREAMREC_REDIS__"
    variables = {
        key.removeprefix(prefix).lower(): value
        for key, value in service_environment(secrets, name).items()
        if key.startswith(prefix)
    }
    return RedisSettings(**{**variables, **redis})  # type: ignore[arg-type]


def test_every_identity_has_its_redis_access_and_an_unknown_one_is_refused(secrets: StackSecrets) -> None:
    assert set(redis_server.REDIS_ACCESS) == set(IDENTITIES)
    intruder = dataclasses.replace(secrets, identities={**secrets.identities, "intruder": secrets.identities["api"]})
    with pytest.raises(StackError, match=r"'intruder'.*REDIS_ACCESS"):
        redis_server.render_acl(intruder)


def test_the_acl_file_is_private_and_holds_password_hashes_only(secrets: StackSecrets) -> None:
    path = redis_server.write_acl_file(secrets)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    lines = {line.split()[1]: line.split() for line in text.splitlines()}
    assert lines["default"][2] == "off" and "+@all" not in lines["default"]
    for name, identity in secrets.identities.items():
        password = identity.redis_password()
        assert password not in text
        digest = f"#{hashlib.sha256(password.encode()).hexdigest()}"
        if redis_server.REDIS_ACCESS[name] is None:
            assert lines[name][2] == "off" and digest not in lines[name]
        else:
            assert lines[name][2:4] == ["on", digest]
    assert set(lines) == {"default", *IDENTITIES}
    written = path.stat().st_mtime_ns
    assert redis_server.write_acl_file(secrets) == path and path.stat().st_mtime_ns == written  # unchanged: kept


def feast_key(join_key: str, entity_id: str, project: str) -> bytes:
    return _redis_key(project, EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity_id)]))


@pytest.mark.parametrize("project", ["streamrec", "t0123456789"])
def test_the_feature_key_patterns_match_feasts_row_keys_of_both_entities_and_nothing_else(project: str) -> None:
    patterns = [pattern.encode() for pattern in redis_server.FEATURE_KEY_PATTERNS]
    for join_key in (contracts.USER_JOIN_KEY, contracts.ITEM_JOIN_KEY):
        key = feast_key(join_key, "42", project)
        assert (
            key.endswith(project.encode())
            and serialize_entity_key(EntityKey(join_keys=[join_key], entity_values=[Value(string_val="42")])) in key
        )
        assert [fnmatch.fnmatchcase(key, pattern) for pattern in patterns].count(True) == 1
    for other in (b"user_id:42", b"streamrec:kept", feast_key("session_id", "42", project)):
        assert not any(fnmatch.fnmatchcase(other, pattern) for pattern in patterns)


def options_of(command: list[str]) -> dict[str, str]:
    return dict(zip(command[1::2], command[2::2], strict=True))


def test_a_secure_server_listens_on_tls_only_with_the_acl_users_and_protected_mode(
    tmp_path: Path, secrets: StackSecrets
) -> None:
    [program] = redis_server.redis_programs(settings_of(tmp_path, secure=True), secrets)
    options = options_of(program.command)
    server = secrets.servers["redis"]
    assert {key: value for key, value in options.items() if key not in {"--dir", "--appendfsync"}} == {
        "--port": "0",
        "--tls-port": "7000",
        "--bind": "127.0.0.1",
        "--save": "",
        "--appendonly": "yes",
        "--tls-cert-file": str(server.cert_file),
        "--tls-key-file": str(server.key_file),
        "--tls-ca-cert-file": str(secrets.ca_file),
        "--tls-auth-clients": "optional",
        "--aclfile": str(redis_server.acl_file(secrets)),
        "--protected-mode": "yes",
    }
    every_password = [identity.redis_password() for identity in secrets.identities.values()]
    assert not any(password in argument for password in every_password for argument in program.command)
    for node in redis_server.redis_programs(settings_of(tmp_path, secure=True, cluster=True), secrets):
        node_options = options_of(node.command)
        assert (node_options["--port"], node_options["--aclfile"]) == ("0", str(redis_server.acl_file(secrets)))
        assert (node_options["--tls-cluster"], node_options["--tls-replication"]) == ("yes", "yes")
    plain = options_of(redis_server.redis_programs(settings_of(tmp_path, secure=False))[0].command)
    assert (plain["--port"], plain["--protected-mode"]) == ("7000", "no") and "--tls-port" not in plain


def test_a_secure_stack_without_its_secrets_is_refused_naming_where_they_come_from(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"LocalStack\(settings\)\.secrets"):
        redis_server.redis_programs(settings_of(tmp_path, secure=True))
    with pytest.raises(StackError, match=r"LocalStack\(settings\)\.secrets"):
        redis_server.finish_start(settings_of(tmp_path, secure=True, cluster=True))


def test_the_stack_itself_connects_as_admin_over_tls(tmp_path: Path, secrets: StackSecrets) -> None:
    admin = redis_server.stack_client_settings(settings_of(tmp_path, secure=True), secrets)
    options = admin.client_options()
    assert (options["username"], options["password"]) == ("admin", secrets.identities["admin"].redis_password())
    assert (options["ssl"], options["ssl_ca_certs"]) == (True, str(secrets.ca_file))
    plain = settings_of(tmp_path, secure=False)
    assert redis_server.stack_client_settings(plain) == plain.redis and plain.redis.client_options() == {}


def features_settings(tmp_path: Path, redis: RedisSettings) -> FeaturesSettings:
    return FeaturesSettings(paths=PathSettings(state_dir=tmp_path), redis=redis)


@pytest.mark.parametrize("cluster", [False, True], ids=["server", "cluster"])
def test_feast_hands_redis_py_the_identitys_credentials_and_tls_files(
    tmp_path: Path, secrets: StackSecrets, cluster: bool
) -> None:
    redis = redis_env_settings(secrets, "streams", port=7000, cluster=cluster)
    string = redis_connection_string(features_settings(tmp_path, redis))
    nodes, kwargs = RedisOnlineStore._parse_connection_string(string)
    assert nodes == [{"host": "127.0.0.1", "port": "7000"}]
    assert kwargs == {**({} if cluster else {"db": 0}), **redis.client_options()}
    assert kwargs["password"] == secrets.identities["streams"].redis_password()
    certificate = secrets.identities["streams"].certificate
    assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (str(certificate.cert_file), str(certificate.key_file))


@pytest.mark.parametrize("password", ["12345", "true", '"quoted"', "null", "p:\"x'"])
def test_a_password_that_looks_like_json_reaches_redis_py_unchanged(tmp_path: Path, password: str) -> None:
    redis = RedisSettings(port=7000, username="api", password=SecretStr(password))
    _, kwargs = RedisOnlineStore._parse_connection_string(redis_connection_string(features_settings(tmp_path, redis)))
    assert kwargs["password"] == password


def test_a_comma_feast_cannot_carry_is_refused_without_showing_the_password(tmp_path: Path) -> None:
    redis = RedisSettings(port=7000, password=SecretStr("top,secret"))
    with pytest.raises(FeaturesError, match=r"redis\.password holds a comma") as raised:
        redis_connection_string(features_settings(tmp_path, redis))
    assert "top" not in str(raised.value)


def test_tls_files_without_tls_or_a_certificate_without_its_key_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"redis\.ca_file: used only over TLS; set redis\.tls = true"):
        RedisSettings(ca_file=tmp_path / "ca.crt")
    with pytest.raises(ValidationError, match=r"set both redis\.cert_file and redis\.key_file"):
        RedisSettings(tls=True, cert_file=tmp_path / "a.crt")
