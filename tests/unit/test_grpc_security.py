"""TLS and caller identity on gRPC (``serving.grpc_security``) and where reloads may point models
(``serving.model_server.model_root``), on in-process servers with certificates from a LocalCA.

The servers here are grpcio servers with two byte-echo methods (one plain, one admin) behind the
same interceptor the API and the model server install, so the rules are checked without a model;
tests/integration/test_grpc_tls.py runs the real servers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

from serving.grpc_security import (
    ServerTls,
    TokenTable,
    caller_check,
    listen,
    open_channel,
    read_ssl_config,
    server_tls,
)
from serving.grpc_security.identity import bearer_token
from serving.model_server.model_root import ModelRoot
from serving.model_server.server import ModelServer, ServerOptions
from serving.protocol.errors import InvalidArgument, PermissionDenied
from serving.protocol.models_config import single_model_config
from streamrec.core.errors import SettingsError
from streamrec.core.settings import GrpcSecurity
from streamrec.ops.stack.certs import IssuedCertificate, LocalCA
from streamrec.ops.stack.programs import grpc_serving

ADMIN = "/test.Admin/Reload"
PLAIN = "/test.Plain/Echo"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "grpc-tokens"
    path.write_text("# identity token\ntrainer trainer-token-1\napi api-token-1\n\ntrainer trainer-token-2\n")
    return path


def server_security(ca: LocalCA, **changes: object) -> GrpcSecurity:
    issued = ca.issue("server")
    fields: dict[str, object] = {
        "tls": True,
        "ca_file": ca.ca_file,
        "cert_file": issued.cert_file,
        "key_file": issued.key_file,
        "admin_identities": ("trainer",),
    }
    return GrpcSecurity(**{**fields, **changes})  # type: ignore[arg-type]


def client_security(
    ca_file: Path, certificate: IssuedCertificate | None = None, token: Path | None = None
) -> GrpcSecurity:
    return GrpcSecurity(
        tls=True,
        ca_file=ca_file,
        cert_file=certificate.cert_file if certificate else None,
        key_file=certificate.key_file if certificate else None,
        token_file=token,
    )


@contextmanager
def echo_server(security: GrpcSecurity, tls: ServerTls | None = None) -> Iterator[str]:
    """A server with health, a plain and an admin echo method, secured as the real servers are."""
    tls = tls if tls is not None else server_tls(security)
    check = caller_check(security, tls, (ADMIN,))
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[check] if check else None)
    echo = grpc.unary_unary_rpc_method_handler(lambda request, _context: request)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("test.Admin", {"Reload": echo}),
            grpc.method_handlers_generic_handler("test.Plain", {"Echo": echo}),
        )
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = listen(server, "127.0.0.1:0", tls)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def call(target: str, security: GrpcSecurity | None, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    """``OK`` or the status code name of one call (health when ``method`` is ``health``)."""
    with open_channel(target, security) as channel:
        try:
            if method == "health":
                stub = health_pb2_grpc.HealthStub(channel)
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[attr-defined]
            else:
                assert channel.unary_unary(method)(b"x", timeout=5, metadata=metadata) == b"x"
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return "OK"


def write_token(directory: Path, token: str) -> Path:
    path = directory / f"token-{token}"
    path.write_text(token + "\n")
    return path


def test_mutual_tls_identifies_callers_by_certificate_and_keeps_admin_calls_to_admins(
    ca: LocalCA, tmp_path: Path
) -> None:
    other = LocalCA.load_or_create(tmp_path / "other")
    with echo_server(server_security(ca, client_verify=True)) as target:
        trainer, api = ca.issue("trainer"), ca.issue("api")
        assert call(target, client_security(ca.ca_file, trainer), ADMIN) == "OK"
        assert call(target, client_security(ca.ca_file, api), ADMIN) == "PERMISSION_DENIED"
        assert call(target, client_security(ca.ca_file, api), PLAIN) == "OK"
        # refused at the handshake: no certificate, one from another CA, plaintext
        assert call(target, client_security(ca.ca_file), "health") == "UNAVAILABLE"
        assert call(target, client_security(ca.ca_file, other.issue("trainer")), ADMIN) == "UNAVAILABLE"
        assert call(target, None, "health") == "UNAVAILABLE"
        # a client that trusts another CA refuses the server
        assert call(target, client_security(other.ca_file, trainer), "health") == "UNAVAILABLE"


def test_tokens_identify_callers_and_health_needs_no_identity(
    ca: LocalCA, tokens_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with echo_server(server_security(ca, tokens_file=tokens_file)) as target:
        anonymous = client_security(ca.ca_file)
        assert call(target, anonymous, "health") == "OK"
        assert call(target, anonymous, PLAIN) == "UNAUTHENTICATED"
        assert call(target, client_security(ca.ca_file, token=write_token(tmp_path, "guess")), PLAIN) == (
            "UNAUTHENTICATED"
        )
        with caplog.at_level(logging.WARNING, logger="serving.grpc_security.identity"):
            api = client_security(ca.ca_file, token=write_token(tmp_path, "api-token-1"))
            assert call(target, api, PLAIN) == "OK"
            assert call(target, api, ADMIN) == "PERMISSION_DENIED"
        assert "refused /test.Admin/Reload to 'api'" in caplog.text
        assert "api-token-1" not in caplog.text
        # both of the trainer's tokens work (a token being rotated), in either header spelling
        for token in ("trainer-token-1", "trainer-token-2"):
            assert call(target, client_security(ca.ca_file, token=write_token(tmp_path, token)), ADMIN) == "OK"
        assert call(target, anonymous, ADMIN, (("authorization", "bearer trainer-token-2"),)) == "OK"
        # without client_verify the server never asks for a certificate, so a CN claims nothing
        impostor = LocalCA.load_or_create(tmp_path / "impostor").issue("trainer")
        assert call(target, client_security(ca.ca_file, impostor), ADMIN) == "UNAUTHENTICATED"


def test_the_stacks_health_probe_dials_with_the_grpc_settings(ca: LocalCA, tokens_file: Path) -> None:
    with echo_server(server_security(ca, tokens_file=tokens_file)) as target:
        assert grpc_serving(target, security=client_security(ca.ca_file))  # no identity needed
        assert not grpc_serving(target)  # plaintext against a TLS server


def test_security_off_keeps_every_call_open_and_tls_alone_keeps_a_server_without_admin_rpcs_open(
    ca: LocalCA,
) -> None:
    with echo_server(GrpcSecurity()) as target:
        assert [call(target, None, method) for method in ("health", PLAIN, ADMIN)] == ["OK", "OK", "OK"]
    tls_only = server_security(ca)
    assert caller_check(tls_only, server_tls(tls_only)) is None  # the API: anyone with TLS may call
    with pytest.raises(SettingsError, match="admin RPCs need a caller identity.*CLIENT_VERIFY.*TOKENS_FILE"):
        caller_check(tls_only, server_tls(tls_only), (ADMIN,))  # the model server must not start so


def test_missing_or_unreadable_files_name_the_setting(ca: LocalCA, tmp_path: Path) -> None:
    assert server_tls(GrpcSecurity()) is None
    with pytest.raises(SettingsError, match="grpc.cert_file is not set: set STREAMREC_GRPC__CERT_FILE"):
        server_tls(GrpcSecurity(tls=True, ca_file=ca.ca_file))
    missing = tmp_path / "missing.crt"
    with pytest.raises(SettingsError, match=f"grpc.cert_file: cannot read {missing}"):
        server_tls(GrpcSecurity(tls=True, cert_file=missing, key_file=ca.issue("server").key_file))
    with pytest.raises(ValidationError, match="cert_file and grpc.key_file go together"):
        GrpcSecurity(cert_file=missing)
    with pytest.raises(SettingsError, match="client_verify needs the CA"):
        server_tls(server_security(ca, ca_file=None, client_verify=True))


def test_a_tokens_file_is_strict_and_lookups_compare_every_entry(tmp_path: Path, tokens_file: Path) -> None:
    table = TokenTable.read(tokens_file)
    assert table.identities == {"trainer", "api"}
    assert (table.identity("api-token-1"), table.identity("trainer-token-2"), table.identity("api")) == (
        "api",
        "trainer",
        None,
    )
    bad = tmp_path / "bad"
    bad.write_text("trainer secret-token extra\n")
    with pytest.raises(SettingsError, match="line 1: expected '<identity> <token>'") as caught:
        TokenTable.read(bad)
    assert "secret-token" not in str(caught.value)
    with pytest.raises(SettingsError, match="one token to two identities"):
        TokenTable([("a", "same"), ("b", "same")])
    assert bearer_token([("authorization", "Bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc"), ("x", "Bearer y")]) is None


def ssl_config_text(issued: IssuedCertificate, ca_file: Path, client_verify: bool) -> str:
    """An SSLConfig as TF Serving reads it: PEM text in quoted strings (newlines escaped)."""

    def quoted(path: Path) -> str:
        return '"' + path.read_text().replace("\n", "\\n") + '"'

    return (
        f"server_key: {quoted(issued.key_file)}\nserver_cert: {quoted(issued.cert_file)}\n"
        f"custom_ca: {quoted(ca_file)}\nclient_verify: {str(client_verify).lower()}\n"
    )


def test_tf_servings_ssl_config_file_serves_mutual_tls(ca: LocalCA, tmp_path: Path, tokens_file: Path) -> None:
    config_file = tmp_path / "ssl.config"
    config_file.write_text(ssl_config_text(ca.issue("server"), ca.ca_file, client_verify=True))
    tls = read_ssl_config(config_file)
    assert tls.client_verify and tls.root_certificates == ca.ca_file.read_bytes()
    assert "PRIVATE KEY" not in repr(tls)
    security = GrpcSecurity(tokens_file=tokens_file, admin_identities=("trainer",))
    with echo_server(security, tls) as target:
        assert call(target, client_security(ca.ca_file, ca.issue("trainer")), ADMIN) == "OK"
        assert call(target, client_security(ca.ca_file, ca.issue("api")), ADMIN) == "PERMISSION_DENIED"
        assert call(target, client_security(ca.ca_file), "health") == "UNAVAILABLE"  # no client certificate


def test_a_bad_ssl_config_file_says_what_the_fields_hold_without_quoting_them(ca: LocalCA, tmp_path: Path) -> None:
    issued = ca.issue("server")
    paths = tmp_path / "paths.config"
    paths.write_text(f'server_key: "{issued.key_file}"\nserver_cert: "{issued.cert_file}"\n')
    with pytest.raises(SettingsError, match="server_key does not hold PEM text.*contents.*not its path"):
        read_ssl_config(paths)
    unquoted = tmp_path / "unquoted.config"
    unquoted.write_text("server_key: " + issued.key_file.read_text())
    with pytest.raises(SettingsError, match="not an SSLConfig text proto \\(line 1") as caught:
        read_ssl_config(unquoted)
    assert "PRIVATE KEY" not in str(caught.value) and caught.value.__cause__ is None
    empty = tmp_path / "empty.config"
    empty.write_text("client_verify: true\n")
    with pytest.raises(SettingsError, match="has no server_key or server_cert"):
        read_ssl_config(empty)


def test_reloads_may_point_only_under_the_model_root_or_at_the_start_up_paths(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "streamrec").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    guard = ModelRoot(root)
    guard.allow([str(tmp_path / "fixed")])
    for allowed in (root / "streamrec", root / "new-model", tmp_path / "fixed"):
        guard.check(single_model_config("m", str(allowed)))
    for refused, error, message in (
        ("/", PermissionDenied, "outside the paths a reload may use"),
        (str(root / "escape"), PermissionDenied, "outside"),  # a symlink out of the root
        (str(tmp_path / "fixed" / "sub"), PermissionDenied, "outside"),
        (f"{root}/streamrec/../../elsewhere", InvalidArgument, "contains '..'"),
        ("gs://bucket/models", InvalidArgument, "is a URI"),
        (f"{root}/a\x00b", InvalidArgument, "NUL"),
    ):
        with pytest.raises(error, match=message):
            guard.check(single_model_config("m", refused))
    with pytest.raises(ValueError, match="file system root"):
        ModelRoot(Path("/"))


def test_a_reload_outside_the_root_changes_nothing_with_security_off(tmp_path: Path) -> None:
    base = tmp_path / "models" / "streamrec"
    base.mkdir(parents=True)
    server = ModelServer(
        ServerOptions(host="127.0.0.1", port=0, model_name="streamrec", model_base_path=base, model_root=base.parent)
    ).start()
    try:
        before = server.core.config
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            request = model_management_pb2.ReloadConfigRequest(config=single_model_config("streamrec", "/"))
            with pytest.raises(grpc.RpcError) as caught:
                stub.HandleReloadConfigRequest(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert server.core.config == before
            moved = single_model_config("other", str(base.parent / "other"))
            stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=moved), timeout=10)
            assert server.core.manager("other") is not None  # security off: anyone may reload inside the root
    finally:
        server.stop(0)
