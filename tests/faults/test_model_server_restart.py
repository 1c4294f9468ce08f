"""Fault 5: the model server is SIGKILLed under Recommend load and started again.

While it is down (and while the restarted one loads its versions) the API answers every call
with a marked fallback (``fallback`` and ``degraded``, reason ``model_unavailable`` or
``model_error``): no call fails. The restarted server reads the
``models.config`` the publishing client keeps, so it serves the same versions under the same
labels as before, and the API's answers come from the model again without a restart by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.api.proto import generated
from serving.api.server import ApiServer
from serving.model_client import ModelServerClient
from serving.settings import ModelServerSection, ServingSettings
from streamrec.core import contracts
from streamrec.core.settings import PathSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_ports
from streamrec.ops.stack.programs import grpc_serving
from tests.integration.test_api_server import MODEL_ITEMS, make_settings, set_up_features
from tests.support.recommend_load import RecommendLoad
from tests.support.tiny_model import example_inputs, write_tiny_model

pb = generated()


class ModelServerProcess:
    """``streamrec model-server`` on ``state_dir``'s models and models.config, as a child process."""

    def __init__(self, state_dir: Path, port: int, log_path: Path) -> None:
        self.state_dir, self.port, self.log_path = state_dir, port, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
        env.update(
            {
                "STREAMREC_PATHS__STATE_DIR": str(self.state_dir),
                "STREAMREC_MODEL_SERVER__PORT": str(self.port),
                "STREAMREC_MODEL_SERVER__FILE_SYSTEM_POLL_WAIT_SECONDS": "0.5",
            }
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 -- our own server
                [sys.executable, "-m", "serving.model_server.cli"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 90
        while not grpc_serving(f"127.0.0.1:{self.port}"):
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def api_settings(local_stack: LocalStack, stack_settings: StackSettings, tmp_path: Path) -> object:
    settings = make_settings(stack_settings, tmp_path / "api", f"fault5{os.getpid()}", "127.0.0.1:1")
    ensure_topics(settings)
    set_up_features(settings)
    return settings


def test_a_model_server_killed_under_load_costs_marked_fallbacks_and_comes_back_as_before(
    api_settings: object, tmp_path: Path
) -> None:
    models_state = tmp_path / "models-state"
    serving_settings = ServingSettings(
        paths=PathSettings(state_dir=models_state), model_server=ModelServerSection(port=free_ports(1)[0])
    )
    for version, bias in ((1, 0.0), (2, 5.0)):
        write_tiny_model(serving_settings.model_base_path, version, item_ids=MODEL_ITEMS, bias=bias)
    server = ModelServerProcess(models_state, serving_settings.model_server.port, tmp_path / "model-server.log")
    server.start()
    with ModelServerClient.from_settings(serving_settings) as admin:
        admin.publish_stable(1)
        admin.publish_canary(2)
    settings = api_settings.model_copy(  # type: ignore[attr-defined]
        update={"model_server": api_settings.model_server.model_copy(update={"port": server.port})}  # type: ignore[attr-defined]
    )
    api = ApiServer(settings)
    port = api.start()
    try:
        with RecommendLoad(port) as load:
            deadline = time.monotonic() + 60
            while sum(load.answers.values()) < 50:
                assert time.monotonic() < deadline, (load.answers, load.errors[:3])
                time.sleep(0.1)
            served_before = {key for key in load.answers if key.startswith("v")}
            server.kill()
            deadline = time.monotonic() + 30
            while load.count("fallback:model_unavailable") < 20:
                assert time.monotonic() < deadline, (load.answers, load.errors[:3])
                time.sleep(0.05)
            server.start()
            answered_after_restart = sum(load.count(key) for key in served_before)
            deadline = time.monotonic() + 60
            while sum(load.count(key) for key in served_before) < answered_after_restart + 50:
                assert time.monotonic() < deadline, (load.answers, load.errors[:3])
                time.sleep(0.1)
        assert load.errors == [], load.errors[:5]
        assert load.unmarked_fallbacks == 0
        # every fallback is marked (above); the model answers come from the versions served before
        served = {key for key in load.answers if not key.startswith("fallback:")}
        assert served_before and served == served_before, load.answers
        with ModelServerClient(f"127.0.0.1:{server.port}", contracts.MODEL_NAME, timeout_s=10.0) as client:
            for label, version in ((contracts.STABLE_LABEL, 1), (contracts.CANARY_LABEL, 2)):
                served, _ = client.predict(example_inputs(["u"]), label=label)
                assert served == version
            assert sorted(status.version for status in client.status() if status.state == "AVAILABLE") == [1, 2]
    finally:
        api.stop(0)
        server.stop()
