"""The local model server's Prometheus series count what its RPCs did (real gRPC on loopback)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from serving.model_client import ModelServerClient, ModelServerRpcError
from streamrec.core import contracts
from tests.support.model_server import running_model_server
from tests.support.tiny_model import example_inputs, write_tiny_model


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_predicts_are_timed_and_errors_counted_by_code(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=[f"item-{k}" for k in range(12)])
    with running_model_server(base) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=10.0, server_base_path=str(base))
        predicts = _sample("streamrec_model_server_request_seconds_count", method="Predict")
        not_found = _sample("streamrec_model_server_errors_total", method="Predict", code="NOT_FOUND")
        for _ in range(3):
            client.predict(example_inputs(["u"]))
        with pytest.raises(ModelServerRpcError) as caught:
            client.predict(example_inputs(["u"]), version=99)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        client.close()
    assert _sample("streamrec_model_server_request_seconds_count", method="Predict") - predicts == 4
    assert _sample("streamrec_model_server_errors_total", method="Predict", code="NOT_FOUND") - not_found == 1
