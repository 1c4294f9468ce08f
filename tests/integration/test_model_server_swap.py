"""Versions change while requests flow: new versions, broken versions, label moves.

The promises under test (issue 5): a version that appears on disk is served within the poll
interval plus its load time with zero failed requests; a broken version directory disturbs
nothing and labels stay where they were, with the error visible in GetModelStatus; the
publish_canary / promote / rollback sequence moves labels without a failed request, and the
models.config it keeps brings a restarted server back with the same labels.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from serving.model_client import ModelLoadError, ModelServerClient
from serving.protocol.models_config import read_config, single_model_config, write_config
from streamrec.core import contracts
from tests.support.model_server import running_model_server
from tests.support.request_stream import RequestStream
from tests.support.tiny_model import example_inputs, write_tiny_model

ITEMS = [f"item-{k}" for k in range(10)]
POLL_S = 0.2


def _wait_state(client: ModelServerClient, version: int, state: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = {item.version: item for item in client.status()}
        if version in found and found[version].state == state:
            return found[version].error_message
        time.sleep(0.05)
    raise AssertionError(f"version {version} never reached {state}: {client.status()}")


def test_new_version_is_served_during_a_request_stream_without_failures(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=ITEMS)
    write_tiny_model(tmp_path / "warm-cache", 1, item_ids=ITEMS, bias=1.0)  # export outside the timed part
    with running_model_server(base, poll_s=POLL_S) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=5.0)
        with RequestStream(client) as stream:
            stream.wait_for_version(1, timeout_s=10)
            appeared = time.monotonic()
            write_tiny_model(base, 2, item_ids=ITEMS, bias=1.0)
            served = stream.wait_for_version(2, timeout_s=POLL_S + 15)
            time.sleep(0.3)  # keep streaming across the unload of version 1
        assert stream.failures == []
        assert served - appeared < POLL_S + 15
        # after the first answer from version 2, nothing is answered by version 1 any more
        assert all(version == 2 for at, version in stream.answers if at > served + 0.1)
        assert _wait_state(client, 1, "END") == ""
        client.close()


def test_broken_version_does_not_disturb_serving(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=ITEMS)
    with running_model_server(base, poll_s=POLL_S) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=5.0)
        with RequestStream(client) as stream:
            write_tiny_model(base, 2, item_ids=ITEMS, broken=True)
            error = _wait_state(client, 2, "END")
            time.sleep(3 * POLL_S)  # a few more polls: the failed version is not retried forever
        assert "cannot be parsed" in error or "SavedModel" in error
        assert stream.failures == []
        assert {version for _, version in stream.answers} == {1}
        assert {item.version: item.state for item in client.status()} == {2: "END", 1: "AVAILABLE"}
        client.close()


def test_publish_canary_promote_rollback_keeps_every_request_answered(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    config_file = tmp_path / "models.config"
    write_tiny_model(base, 1, item_ids=ITEMS)
    with running_model_server(base, poll_s=POLL_S) as server:
        client = ModelServerClient(
            server.target, contracts.MODEL_NAME, timeout_s=5.0, config_file=config_file, server_base_path=str(base)
        )
        client.publish_stable(1)
        assert client.labels() == {"stable": 1, "canary": 1}
        with RequestStream(client, label="stable") as stable, RequestStream(client, label="canary") as canary:
            write_tiny_model(base, 2, item_ids=ITEMS, bias=1.0)
            client.publish_canary(2)
            assert client.labels() == {"stable": 1, "canary": 2}
            canary.wait_for_version(2, timeout_s=5)
            assert client.predict(example_inputs(["u"]), label="stable")[0] == 1

            # a broken canary: the publish fails, labels and serving stay as they were
            write_tiny_model(base, 3, item_ids=ITEMS, broken=True)
            with pytest.raises(ModelLoadError, match="version 3"):
                client.publish_canary(3)
            assert client.labels() == {"stable": 1, "canary": 2}
            assert any(item.version == 3 and item.error_message for item in client.status())

            assert client.promote(2) == 2
            stable.wait_for_version(2, timeout_s=5)
            write_tiny_model(base, 4, item_ids=ITEMS, bias=2.0)
            client.publish_canary(4)
            canary.wait_for_version(4, timeout_s=5)
            assert client.rollback() == 2
            assert client.labels() == {"stable": 2, "canary": 2}
            rolled_back = time.monotonic()
            time.sleep(0.3)
        assert stable.failures == [] and canary.failures == []
        assert all(version == 2 for at, version in canary.answers if at > rolled_back + 0.05)
        loaded = {item.version for item in client.status() if item.state == "AVAILABLE"}
        assert 2 in loaded and len(loaded) <= client.max_versions_loaded
        client.close()

    # the kept models.config brings a restarted server back with the same labels
    model = read_config(config_file).model_config_list.config[0]
    assert dict(model.version_labels) == {"stable": 2, "canary": 2}
    with running_model_server(config_file=config_file, allow_version_labels_for_unavailable_models=True) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=5.0)
        client.wait_until_available(2, timeout_s=30)
        assert client.predict(example_inputs(["u"]), label="stable")[0] == 2
        client.close()


def test_a_changed_config_file_is_applied_by_the_poller(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=ITEMS)
    write_tiny_model(base, 2, item_ids=ITEMS, bias=1.0)
    config_file = tmp_path / "models.config"
    config = single_model_config(contracts.MODEL_NAME, str(base))
    write_config(config_file, config)
    with running_model_server(config_file=config_file, config_poll_s=0.1) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=5.0)
        assert client.predict(example_inputs(["u"]))[0] == 2  # latest
        with RequestStream(client) as stream:
            config.model_config_list.config[0].model_version_policy.specific.versions.append(1)
            write_config(config_file, config)  # pin version 1: the poller loads it, then drops 2
            stream.wait_for_version(1, timeout_s=15)
            _wait_state(client, 2, "END")
        assert stream.failures == []
        client.close()
