"""Contract tests of the model client against a model server (real gRPC on loopback).

Only the fixture knows which server runs; every test talks through ``ModelServerClient`` and
standard TF Serving RPCs, so pointing ``served`` at a real ``tensorflow/serving`` (same base path
mounted, labels allowed) runs them unchanged. Expected scores come from ``expected_scores``,
the tiny model's hand-written numpy formula.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tensorflow_serving.config import model_server_config_pb2

from serving.model_client import ModelServerClient, ModelServerRpcError
from serving.model_server.versions import LoadedVersion
from serving.protocol.models_config import single_model_config
from streamrec.core import contracts
from streamrec.core.attributes import user_model_inputs
from tests.support.model_server import running_model_server
from tests.support.tiny_model import TINY_SCHEMA, example_inputs, expected_scores, expected_top, write_tiny_model

ITEMS = [f"item-{k}" for k in range(12)]
BIAS = {1: 0.0, 2: 0.5}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelServerClient, Path]]:
    base = tmp_path_factory.mktemp("contract") / contracts.MODEL_NAME
    for version, bias in BIAS.items():
        write_tiny_model(base, version, item_ids=ITEMS, bias=bias)
    with running_model_server(base) as server:
        client = ModelServerClient(server.target, contracts.MODEL_NAME, timeout_s=10.0, server_base_path=str(base))
        yield client, base
        client.close()


@pytest.fixture(scope="module")
def labelled(served: tuple[ModelServerClient, Path]) -> ModelServerClient:
    """Both versions loaded, ``stable`` on 1 and ``canary`` on 2, set the way TF Serving needs."""
    client, base = served
    config = _config(base, versions=[1, 2], labels={})
    client.reload_config(config)
    client.wait_until_available(1, timeout_s=30)
    client.reload_config(_config(base, versions=[1, 2], labels={"stable": 1, "canary": 2}))
    return client


def _config(base: Path, *, versions: list[int], labels: dict[str, int]) -> model_server_config_pb2.ModelServerConfig:
    config = single_model_config(contracts.MODEL_NAME, str(base))
    model = config.model_config_list.config[0]
    model.model_version_policy.specific.versions.extend(versions)
    model.version_labels.update(labels)
    return config


def _ids(row: np.ndarray) -> list[str]:
    return [item.decode() for item in row if item]


def test_latest_version_answers_with_the_hand_computed_ranking(served: tuple[ModelServerClient, Path]) -> None:
    client, _ = served
    inputs = example_inputs(
        ["u1", "u2"], recent_items=[["item-3", "item-4"], []], exclude_items=[["item-0"], ["item-1", "item-2"]]
    )
    version, outputs = client.predict(inputs, signature=contracts.RECOMMEND_SIGNATURE)
    assert version == 2
    assert outputs["item_ids"].shape == (2, contracts.TOP_K_EXPORTED)
    assert outputs["scores"].dtype == np.float32
    first = _ids(outputs["item_ids"][0])
    assert first == expected_top(ITEMS, ["item-3", "item-4"], exclude=["item-0"], bias=0.5, k=len(ITEMS))
    assert "item-0" not in first and len(first) == len(ITEMS) - 1
    assert _ids(outputs["item_ids"][1]) == expected_top(ITEMS, [], exclude=["item-1", "item-2"], bias=0.5, k=20)
    scores = expected_scores(ITEMS, ["item-3", "item-4"], bias=0.5)
    np.testing.assert_allclose(outputs["scores"][0][: len(first)], [scores[i] for i in first], rtol=1e-5)
    assert np.isneginf(outputs["scores"][0][len(first) :]).all()  # the documented padding


def test_signatures_take_the_flat_call_and_answer_as_the_keyword_call(served: tuple[ModelServerClient, Path]) -> None:
    import tensorflow as tf

    _, base = served
    loaded = LoadedVersion(contracts.MODEL_NAME, 1, base / "1")
    loaded.load()
    for name in (contracts.RECOMMEND_SIGNATURE, "score"):
        signature = loaded.signatures[name]
        assert signature.flat_order is not None and sorted(signature.flat_order) == sorted(signature.inputs)
    signature = loaded.signatures[contracts.RECOMMEND_SIGNATURE]
    inputs = example_inputs(["u1", "u2"], recent_items=[["item-3"], []], exclude_items=[["item-0"], ["item-5"]])
    tensors = {alias: tf.constant(value, dtype=signature.inputs[alias].dtype) for alias, value in inputs.items()}
    flat, keyword = signature(tensors), signature.function(**tensors)
    assert sorted(flat) == sorted(keyword) == sorted(signature.outputs)
    for alias in signature.outputs:
        np.testing.assert_array_equal(flat[alias].numpy(), keyword[alias].numpy())
    loaded.unload()


def test_score_signature_scores_the_given_items(served: tuple[ModelServerClient, Path]) -> None:
    client, _ = served
    inputs = {k: v for k, v in example_inputs(["u1"], recent_items=[["item-5"]]).items() if k != "exclude_items"}
    inputs["item_ids"] = np.array([["item-7", "item-5", "unknown"]], dtype=object)
    version, outputs = client.predict(inputs, signature=contracts.SCORE_SIGNATURE)
    scores = expected_scores(ITEMS, ["item-5"], bias=BIAS[version])
    np.testing.assert_allclose(outputs["scores"][0][:2], [scores["item-7"], scores["item-5"]], rtol=1e-5)
    assert np.isneginf(outputs["scores"][0][2])


def test_predict_by_version_and_by_label(labelled: ModelServerClient) -> None:
    inputs = example_inputs(["u1"], recent_items=[["item-2"]])
    for version in (1, 2):
        served_by, outputs = labelled.predict(inputs, version=version)
        assert served_by == version
        top = _ids(outputs["item_ids"][0])[0]
        assert outputs["scores"][0][0] == pytest.approx(expected_scores(ITEMS, ["item-2"], bias=BIAS[version])[top])
    assert labelled.predict(inputs, label="stable")[0] == 1
    assert labelled.predict(inputs, label="canary")[0] == 2


def test_metadata_lists_the_contract_signatures(served: tuple[ModelServerClient, Path]) -> None:
    client, _ = served
    metadata = client.metadata()
    assert metadata.version == 2
    assert {"recommend", "score", contracts.SIMILAR_SIGNATURE, "serving_default"} <= set(metadata.signatures)
    recommend = metadata.signatures["recommend"]
    expected_inputs = {*user_model_inputs(TINY_SCHEMA), "exclude_items"}
    assert set(recommend.inputs) == expected_inputs
    assert set(recommend.outputs) == {"item_ids", "scores"}
    assert [d.size for d in recommend.outputs["item_ids"].tensor_shape.dim] == [-1, contracts.TOP_K_EXPORTED]
    assert [d.size for d in recommend.inputs["recent_items"].tensor_shape.dim] == [-1, contracts.RECENT_ITEMS_MAX]
    assert set(metadata.signatures["score"].inputs) == expected_inputs - {"exclude_items"} | {"item_ids"}
    similar = metadata.signatures[contracts.SIMILAR_SIGNATURE]
    assert set(similar.inputs) == {"item_id", "exclude_items"}
    assert set(similar.outputs) == {"item_ids", "scores"}
    assert [d.size for d in similar.outputs["scores"].tensor_shape.dim] == [-1, contracts.TOP_K_EXPORTED]


def test_status_reports_available_versions(labelled: ModelServerClient) -> None:
    states = {item.version: item.state for item in labelled.status()}
    assert states == {1: "AVAILABLE", 2: "AVAILABLE"}
    assert labelled.status(2)[0].error_message == ""


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.predict(example_inputs(["u"]), version=99), grpc.StatusCode.NOT_FOUND),
        (lambda c: c.predict(example_inputs(["u"]), label="no-such-label"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.predict(example_inputs(["u"]), signature="nope"), grpc.StatusCode.FAILED_PRECONDITION),
        (
            lambda c: c.predict({k: v for k, v in example_inputs(["u"]).items() if k != "segment"}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda c: c.predict({**example_inputs(["u"]), "count_1h": np.array([1.5], dtype=np.float32)}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda c: c.predict({**example_inputs(["u"]), "recent_items": np.array([["a", "b"]], dtype=object)}),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda c: c.status(99), grpc.StatusCode.NOT_FOUND),
    ],
    ids=[
        "unknown-version",
        "unknown-label",
        "unknown-signature",
        "missing-input",
        "wrong-dtype",
        "wrong-shape",
        "status-unknown-version",
    ],  # fmt: skip
)
def test_bad_requests_get_tf_servings_codes(labelled: ModelServerClient, call: object, code: grpc.StatusCode) -> None:
    with pytest.raises(ModelServerRpcError) as caught:
        call(labelled)  # type: ignore[operator]
    assert caught.value.code == code, caught.value.details
    assert caught.value.details


def test_unknown_model_is_not_found(served: tuple[ModelServerClient, Path]) -> None:
    client, _ = served
    other = ModelServerClient(client.target, "no-such-model", timeout_s=5.0)
    with pytest.raises(ModelServerRpcError) as caught:
        other.predict(example_inputs(["u"]))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ModelServerRpcError) as caught:
        other.status()
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    other.close()


def test_a_label_may_only_move_to_an_available_version(labelled: ModelServerClient) -> None:
    base = Path(labelled.server_base_path or "")
    with pytest.raises(ModelServerRpcError) as caught:
        labelled.reload_config(_config(base, versions=[1, 2], labels={"stable": 7, "canary": 2}))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not currently available" in caught.value.details
    # the failed reload changed nothing: the labels still answer from their versions
    assert labelled.predict(example_inputs(["u"]), label="stable")[0] == 1
    assert labelled.predict(example_inputs(["u"]), label="canary")[0] == 2
