"""``streamrec model-server`` as its own process: TF Serving's flags, health, Predict, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.model_client import ModelServerClient
from streamrec.core import contracts
from streamrec.ops.stack.ports import free_ports
from tests.support.tiny_model import example_inputs, write_tiny_model


def test_model_server_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 3, item_ids=["a", "b", "c"])
    (port,) = free_ports(1)
    env = {**os.environ, "STREAMREC_PATHS__STATE_DIR": str(tmp_path / "state")}
    command = [
        sys.executable, "-m", "serving.model_server.cli",
        "--port", str(port), "--model_name", contracts.MODEL_NAME, "--model_base_path", str(base),
        "--file_system_poll_wait_seconds", "0.5", "--max_num_load_retries", "0",
    ]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, log_path.read_text()[-2000:]
        with ModelServerClient(f"127.0.0.1:{port}", contracts.MODEL_NAME, timeout_s=5.0) as client:
            version, outputs = client.predict(example_inputs(["u"]))
            assert version == 3
            assert [item for item in outputs["item_ids"][0] if item] == [b"a", b"b", b"c"]
        channel.close()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, log_path.read_text()[-2000:]
    assert "model server stopped" in log_path.read_text()
