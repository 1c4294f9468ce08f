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


def _wait_for_answers(stream: RequestStream, count: int, timeout_s: float = 30.0) -> None:
    """Until ``stream`` holds ``count`` answers (its calls run one after another)."""
    deadline = time.monotonic() + timeout_s
    while len(stream.answers) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(stream.answers)} of {count} answers in {timeout_s} s: {stream.failures[:3]}")
        time.sleep(0.01)


def test_new_version_is_served_during_a_request_stream_without_failures(tmp_path: Path) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=ITEMS)
    write_tiny_model(tmp_path / "warm-cache", 1, item_ids=ITEMS, bias=1.0)  # export outside the timed part
    with running_model_server(base, poll_s=POLL_S) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=5.0)
        with RequestStream(client) as stream:
            stream.wait_for_version(1, timeout_s=30)
            write_tiny_model(base, 2, item_ids=ITEMS, bias=1.0)
            stream.wait_for_version(2, timeout_s=POLL_S + 15)
            # keep streaming across the unload of version 1, and a few calls past it
            assert _wait_state(client, 1, "END") == ""
            _wait_for_answers(stream, len(stream.answers) + 5)
        assert stream.failures == []
        # the calls run one after another: after the first answer from version 2, none from version 1
        versions = [version for _, version in stream.answers]
        assert set(versions[versions.index(2) :]) == {2}
        client.close()


def test_broken_version_does_not_disturb_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = tmp_path / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=ITEMS)
    with running_model_server(base, poll_s=POLL_S) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=5.0)
        with RequestStream(client) as stream:
            write_tiny_model(base, 2, item_ids=ITEMS, broken=True)
            error = _wait_state(client, 2, "END")
            # three more polls, run here so they have happened: a retry would start loading version
            # 2 again (state LOADING) inside the poll
            for _ in range(3):
                server.server.core.poll()
            _wait_for_answers(stream, len(stream.answers) + 5)
        assert "cannot be parsed" in error or "SavedModel" in error
        load_failures = [r for r in caplog.records if "version: 2} failed" in r.getMessage()]
        assert len(load_failures) == 1, [r.getMessage() for r in load_failures]
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
            canary.wait_for_version(2, timeout_s=30)
            assert client.predict(example_inputs(["u"]), label="stable")[0] == 1

            # a broken canary: the publish fails, labels and serving stay as they were
            write_tiny_model(base, 3, item_ids=ITEMS, broken=True)
            with pytest.raises(ModelLoadError, match="version 3"):
                client.publish_canary(3)
            assert client.labels() == {"stable": 1, "canary": 2}
            assert any(item.version == 3 and item.error_message for item in client.status())

            assert client.promote(2) == 2
            stable.wait_for_version(2, timeout_s=30)
            write_tiny_model(base, 4, item_ids=ITEMS, bias=2.0)
            client.publish_canary(4)
            canary.wait_for_version(4, timeout_s=30)
            assert client.rollback() == 2
            assert client.labels() == {"stable": 2, "canary": 2}
            # the call in flight during the rollback may still resolve "canary" to 4; every later one is 2
            rolled_back = len(canary.answers) + 1
            _wait_for_answers(canary, rolled_back + 5)
            _wait_for_answers(stable, len(stable.answers) + 5)
        assert stable.failures == [] and canary.failures == []
        assert {version for _, version in canary.answers[rolled_back:]} == {2}
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
