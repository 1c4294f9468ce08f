"""gRPC with security on: the real model server (mutual TLS, admin identities) and the real API
(TLS, bearer tokens) in this process, the API predicting through the model server over mutual TLS,
with the identities of a secure stack (``StackSecrets``: a LocalCA in tmp_path, one certificate
and token per service).

Refused: plaintext clients, clients that trust another CA, a model-server client without a
certificate, a caller without a token at the API, the API's identity on the admin RPC (labels and
models.config unchanged), any reload outside the model root. Allowed: health without identity,
the trainer's and the evaluator's label moves, Recommend end to end. ``streamrec model-server``
itself takes TF Serving's ``--ssl_config_file`` and the tokens file from its settings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api.server import ApiServer
from serving.api.settings import ApiSettings
from serving.grpc_security import open_channel
from serving.model_client import ModelServerClient, ModelServerRpcError
from serving.model_server.core import CoreOptions
from serving.model_server.server import ModelServer, ServerOptions
from serving.protocol.models_config import read_config, single_model_config
from serving.settings import ModelServerSection, ServingSettings
from streamrec.core import contracts
from streamrec.core.settings import GrpcSecurity, PathSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.certs import LocalCA
from streamrec.ops.stack.identities import StackSecrets
from streamrec.ops.stack.ports import free_ports
from tests.integration.test_api_server import MODEL_ITEMS, make_settings, pb, set_up_features
from tests.support.tiny_model import example_inputs, write_tiny_model
from tests.unit.test_grpc_security import ssl_config_text

BIAS = {1: 0.0, 2: 5.0}


@dataclass(frozen=True)
class SecureModels:
    server: ModelServer
    state_dir: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "models" / "models.config"

    @property
    def base_path(self) -> Path:
        return self.state_dir / "models" / contracts.MODEL_NAME

    def labels(self) -> dict[str, int]:
        config = self.server.core.config
        assert config is not None
        return dict(config.model_config_list.config[0].version_labels)


def identity(secrets: StackSecrets, name: str, *, certificate: bool = True, token: bool = True) -> GrpcSecurity:
    """How the stack's process ``name`` dials (and, for a server, listens): its certificate and token."""
    issued = secrets.identities[name].certificate
    return GrpcSecurity(
        tls=True,
        ca_file=secrets.ca_file,
        cert_file=issued.cert_file if certificate else None,
        key_file=issued.key_file if certificate else None,
        token_file=secrets.identities[name].grpc_token_file if token else None,
        tokens_file=secrets.grpc_tokens_file,
    )


def client(models: SecureModels, security: GrpcSecurity | None) -> ModelServerClient:
    """The client as the trainer and evaluator build it (``from_settings``), as identity ``security``."""
    host, port = models.target.rsplit(":", 1)
    settings = ServingSettings(
        paths=PathSettings(state_dir=models.state_dir),
        model_server=ModelServerSection(host=host, port=int(port), request_timeout_ms=10_000, admin_timeout_s=10.0),
        grpc=security or GrpcSecurity(),
    )
    built = ModelServerClient.from_settings(settings)
    assert (built.config_file, built.server_base_path) == (models.config_file, str(models.base_path))
    return built


def health(target: str, security: GrpcSecurity | None) -> str:
    with open_channel(target, security) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> StackSecrets:
    return StackSecrets.ensure(tmp_path_factory.mktemp("secrets"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, secrets: StackSecrets) -> Iterator[SecureModels]:
    state_dir = tmp_path_factory.mktemp("tls-state")
    base_path = state_dir / "models" / contracts.MODEL_NAME
    for version, bias in BIAS.items():
        write_tiny_model(base_path, version, item_ids=MODEL_ITEMS, bias=bias)
    server = ModelServer(
        ServerOptions(
            host="127.0.0.1",
            port=0,
            model_name=contracts.MODEL_NAME,
            model_base_path=base_path,
            file_system_poll_wait_seconds=0,
            core=CoreOptions(max_num_load_retries=0, initial_load_timeout_s=60.0),
            security=identity(secrets, "model-server").model_copy(update={"client_verify": True}),
            model_root=state_dir / "models",
        )
    ).start()
    running = SecureModels(server, state_dir)
    with client(running, identity(secrets, "trainer")) as trainer:
        trainer.publish_stable(1)
        trainer.publish_canary(2)
    try:
        yield running
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def api(
    local_stack: object, stack_settings: StackSettings, secrets: StackSecrets, models: SecureModels
) -> Iterator[ApiServer]:
    project = f"tls{uuid.uuid4().hex[:8]}"
    plain = make_settings(stack_settings, models.state_dir, project, models.target)
    settings: ApiSettings = plain.model_copy(
        update={"grpc": identity(secrets, "api"), "api": plain.api.model_copy(update={"health_port": free_ports(1)[0]})}
    )
    ensure_topics(settings)
    set_up_features(settings)
    server = ApiServer(settings)
    server.start()
    yield server
    server.stop(1)


def test_the_model_server_refuses_plaintext_foreign_cas_and_clients_without_a_certificate(
    models: SecureModels, secrets: StackSecrets, tmp_path: Path
) -> None:
    other = LocalCA.load_or_create(tmp_path / "other-ca")
    foreign = other.issue("trainer")
    trainer = identity(secrets, "trainer")
    assert health(models.target, trainer) == "SERVING"
    assert health(models.target, None) == "UNAVAILABLE"  # plaintext
    assert health(models.target, identity(secrets, "trainer", certificate=False)) == "UNAVAILABLE"
    assert health(models.target, trainer.model_copy(update={"ca_file": other.ca_file})) == "UNAVAILABLE"
    impostor = trainer.model_copy(update={"cert_file": foreign.cert_file, "key_file": foreign.key_file})
    assert health(models.target, impostor) == "UNAVAILABLE"
    with client(models, None) as plaintext, pytest.raises(ModelServerRpcError) as caught:
        plaintext.status()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_apis_identity_cannot_move_labels_and_a_refused_move_changes_nothing(
    models: SecureModels, secrets: StackSecrets
) -> None:
    labels, stored = models.labels(), models.config_file.read_text()
    with client(models, identity(secrets, "api")) as api_client:
        assert api_client.available_versions() == [2, 1]  # reads are open to any identity
        with pytest.raises(ModelServerRpcError) as caught:
            api_client.promote(2)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "caller 'api' is not one of grpc.admin_identities" in caught.value.details
    assert (models.labels(), models.config_file.read_text()) == (labels, stored)


def test_a_reload_outside_the_model_root_changes_nothing_even_for_the_trainer(
    models: SecureModels, secrets: StackSecrets
) -> None:
    before = models.server.core.config
    with client(models, identity(secrets, "trainer")) as trainer:
        for base_path, code in (
            ("/", grpc.StatusCode.PERMISSION_DENIED),
            (f"{models.base_path}/../../..", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(ModelServerRpcError) as caught:
                trainer.reload_config(single_model_config(contracts.MODEL_NAME, base_path))
            assert caught.value.code == code
    assert models.server.core.config == before
    assert read_config(models.config_file).model_config_list.config[0].base_path == str(models.base_path)


def test_the_api_serves_over_tls_to_callers_with_a_token_and_health_to_anyone(
    api: ApiServer, models: SecureModels, secrets: StackSecrets, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{api.port}"
    request = pb.pb2.RecommendRequest(user_id="1", k=5)

    def recommend(security: GrpcSecurity | None) -> object:
        with open_channel(target, security) as channel:
            try:
                return pb.grpc.RecommenderStub(channel).Recommend(request, timeout=10)
            except grpc.RpcError as exc:
                return exc.code().name

    anonymous = identity(secrets, "admin", certificate=False, token=False)
    assert health(target, anonymous) == "SERVING"
    # the plaintext health port (Kubernetes' gRPC probes) answers the same, and serves nothing else
    health_target = f"127.0.0.1:{api.health_port}"
    assert health(health_target, None) == "SERVING"
    with open_channel(health_target, None) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb.grpc.RecommenderStub(channel).Recommend(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert recommend(anonymous) == "UNAUTHENTICATED"
    assert recommend(None) == "UNAVAILABLE"  # plaintext
    other = LocalCA.load_or_create(tmp_path / "other-ca")
    assert recommend(identity(secrets, "admin").model_copy(update={"ca_file": other.ca_file})) == "UNAVAILABLE"
    response = recommend(identity(secrets, "admin", certificate=False))  # the simulator's way: token only
    assert not isinstance(response, str), response
    # the API reached the model server over mutual TLS: a model's answer, not the fallback
    assert (response.fallback, response.degraded, len(response.items)) == (False, False, 5)  # type: ignore[attr-defined]
    assert response.model_version == models.labels()[response.arm]  # type: ignore[attr-defined]


def test_the_evaluator_may_move_labels(models: SecureModels, secrets: StackSecrets) -> None:
    with client(models, identity(secrets, "evaluator")) as evaluator:
        assert evaluator.rollback() == 1
    assert models.labels() == {"stable": 1, "canary": 1}
    assert dict(read_config(models.config_file).model_config_list.config[0].version_labels) == models.labels()


def test_the_model_server_process_serves_tls_from_tf_servings_ssl_config_file(
    tmp_path: Path, secrets: StackSecrets
) -> None:
    base = tmp_path / "state" / "models" / contracts.MODEL_NAME
    write_tiny_model(base, 3, item_ids=["a", "b", "c"])
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(
        ssl_config_text(secrets.identities["model-server"].certificate, secrets.ca_file, client_verify=False)
    )
    (port,) = free_ports(1)
    env = {
        **os.environ,
        "STREAMREC_PATHS__STATE_DIR": str(tmp_path / "state"),
        "STREAMREC_GRPC__TOKENS_FILE": str(secrets.grpc_tokens_file),
    }
    command = [
        sys.executable, "-m", "serving.model_server.cli", "--port", str(port), "--model_name", contracts.MODEL_NAME,
        "--model_base_path", str(base), "--max_num_load_retries", "0", "--ssl_config_file", str(ssl_config),
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    anonymous = identity(secrets, "admin", certificate=False, token=False)
    try:
        deadline = time.monotonic() + 60
        while health(target, anonymous) != "SERVING" and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health(target, anonymous) == "SERVING", log_path.read_text()[-2000:]
        assert health(target, None) == "UNAVAILABLE"
        server_base_path = str(base)
        with ModelServerClient(target, timeout_s=5.0, server_base_path=server_base_path, security=anonymous) as nobody:
            with pytest.raises(ModelServerRpcError) as caught:
                nobody.predict(example_inputs(["u"]))
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        api = identity(secrets, "api", certificate=False)
        with ModelServerClient(target, timeout_s=5.0, server_base_path=server_base_path, security=api) as caller:
            assert caller.predict(example_inputs(["u"]))[0] == 3
            with pytest.raises(ModelServerRpcError) as caught:
                caller.publish_stable(3)
            assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        trainer = identity(secrets, "trainer", certificate=False)
        with ModelServerClient(target, timeout_s=5.0, server_base_path=server_base_path, security=trainer) as admin:
            admin.publish_stable(3)
            assert admin.predict(example_inputs(["u"]), label="stable")[0] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, log_path.read_text()[-2000:]
    written = log_path.read_text()
    assert "(TLS)" in written
    secret_texts = [secrets.identities[name].grpc_token() for name in ("api", "trainer")]
    secret_texts.append(secrets.identities["model-server"].certificate.key_file.read_text().splitlines()[1])
    assert not [text for text in secret_texts if text in written]
