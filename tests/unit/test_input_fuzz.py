"""Random and oversized inputs at every edge: the event decoder, the API's Recommend and the model
server's Predict. Each property is an invariant, never a sample: the decoder returns a valid event
or raises ``EventValidationError``; Recommend answers OK exactly when the request keeps every
limit (computed here from the limits, not by the code under test) and INVALID_ARGUMENT otherwise;
Predict answers a clear client-side code; nothing crashes, answers INTERNAL/UNKNOWN or hangs
(every call has a deadline).

The API runs in this process on its real gRPC server (``recommender_server``) with the real
ranker and model client in front of a real local model server serving the tiny model; only the
feature store and the impression producer are replaced at their boundaries (no Redis, no Kafka).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from serving.api.arms import CanaryGate
from serving.api.impressions import PendingImpression
from serving.api.metrics import ApiMetrics
from serving.api.proto import generated
from serving.api.ranking import Ranker
from serving.api.server import recommender_server
from serving.api.service import RecommenderService
from serving.api.settings import ApiSection, ApiSettings
from serving.api.similar import SimilarItems
from serving.api.trending import TrendingSnapshot
from serving.api.user_features import UserFeatures
from serving.model_client import ModelServerClient
from serving.model_server.core import CoreOptions
from serving.model_server.server import ModelServer, ServerOptions
from serving.protocol.tensors import MAX_TENSOR_ELEMENTS
from serving.settings import ModelServerSection
from streamrec.core import contracts
from streamrec.core.attributes import user_model_inputs
from streamrec.core.errors import EventValidationError
from streamrec.core.events import Click, DeadLetter, Event, Impression, Interaction, LabeledExample, decode_event
from tests.support.tiny_model import TINY_SCHEMA, write_tiny_model

pb = generated()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ITEMS = [str(i) for i in range(1, 41)]
INPUTS = user_model_inputs(TINY_SCHEMA)
LIMITS = ApiSection(
    port=0,
    metrics_port=0,
    max_k=20,
    default_k=5,
    max_request_bytes=4096,
    max_receive_bytes=64 * 1024,
    max_user_id_chars=40,
    max_item_id_chars=24,
    max_exclude_items=12,
    max_candidate_items=12,
    max_context_entries=6,
    max_context_chars=30,
)
CALL_TIMEOUT_S = 20.0  # far above any answer's time: reaching it is a hang

# -- the event decoder ------------------------------------------------------------------------
EVENT_TYPES: tuple[type[Event], ...] = (Interaction, Impression, Click, LabeledExample, DeadLetter)
VALID_INTERACTION = {
    "event_id": "e1",
    "event_time": "2026-01-01T00:00:00Z",
    "user_id": "u1",
    "item_id": "i1",
    "kind": "view",
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
# an interaction with some fields replaced by anything JSON can hold
mutated_interactions = st.fixed_dictionaries(
    {},
    optional={name: json_values | st.just(value) for name, value in VALID_INTERACTION.items()}
    | {"rating": json_values, "schema_version": json_values, "extra": json_values},
)


def check_decoded(raw: bytes | None, event_type: type[Event]) -> None:
    try:
        event = decode_event(raw, event_type)
    except EventValidationError as exc:
        assert exc.reason in ("undecodable", "schema", "schema_version")
        return
    assert isinstance(event, event_type)
    assert decode_event(event.to_bytes(), event_type) == event  # what decodes re-encodes to itself


@FUZZ
@given(raw=st.binary(max_size=512), event_type=st.sampled_from(EVENT_TYPES))
@example(raw=b"[" * 100_000, event_type=Interaction)  # nested past the recursion limit
@example(raw=b'{"event_id": ' + b"9" * 5000 + b"}", event_type=Interaction)  # past the int digit limit
@example(raw=b"\xff\xfe" * 1000, event_type=Click)
def test_random_bytes_decode_to_an_event_or_a_validation_error(raw: bytes, event_type: type[Event]) -> None:
    check_decoded(raw, event_type)


@FUZZ
@given(payload=mutated_interactions | json_values)
@example(payload={**VALID_INTERACTION, "event_time": "0001-01-01T00:00:00+01:00"})  # before year 1 in UTC
@example(payload={**VALID_INTERACTION, "event_time": 1e300})
@example(payload={**VALID_INTERACTION, "user_id": "u" * 1_000_000})
@example(payload={**VALID_INTERACTION, "rating": float("nan")})
def test_random_json_decodes_to_an_interaction_or_a_validation_error(payload: Any) -> None:
    check_decoded(json.dumps(payload).encode(), Interaction)


# -- the API's Recommend and the model server's Predict ----------------------------------------
class StoreWithoutRows:
    """The feature store's reader at its boundary: user "known" has recent items, others nothing."""

    def read(self, user_id: str) -> UserFeatures:
        values: dict[str, Any] = {"recent_items": ["1", "2"]} if user_id == "known" else {}
        return UserFeatures.from_inputs(user_id, values, INPUTS, found_views=frozenset({"user_activity"}))

    def unknown(self, user_id: str) -> UserFeatures:
        return UserFeatures.unknown(user_id, INPUTS)


class ImpressionSink:
    def __init__(self) -> None:
        self.count = 0

    def log(self, pending: PendingImpression) -> None:
        self.count += 1


class FixedTrending:
    snapshot = TrendingSnapshot(tuple(ITEMS[::-1]), tuple(float(i) for i in range(len(ITEMS))), refreshed_at=1.0)


@dataclass(frozen=True)
class Servers:
    api_target: str
    model_target: str
    client: ModelServerClient


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = Path(tmp_path_factory.mktemp("fuzz-models")) / contracts.MODEL_NAME
    write_tiny_model(base, 1, item_ids=ITEMS)
    model_server = ModelServer(
        ServerOptions(
            host="127.0.0.1",
            port=0,
            model_name=contracts.MODEL_NAME,
            model_base_path=base,
            file_system_poll_wait_seconds=0,
            grpc_max_message_mb=1,
            grpc_workers=4,
            max_concurrent_rpcs=64,
            core=CoreOptions(max_num_load_retries=0, initial_load_timeout_s=60.0),
        )
    ).start()
    model_target = f"127.0.0.1:{model_server.port}"
    client = ModelServerClient(model_target, timeout_s=5.0, server_base_path=str(base))
    client.publish_stable(1)  # canary users are served by stable too
    host, port = model_target.rsplit(":", 1)
    api_settings = ApiSettings(
        model_server=ModelServerSection(host=host, port=int(port), request_timeout_ms=5_000), api=LIMITS
    )
    metrics = ApiMetrics()
    ranker = Ranker(
        client,
        FixedTrending(),
        metrics,
        inputs=INPUTS,
        budget_s=5.0,
        canary_gate=CanaryGate(5.0),
        interleave=True,
    )
    similar = SimilarItems(client, FixedTrending(), metrics, budget_s=5.0)
    service = RecommenderService(
        api_settings,
        StoreWithoutRows(),  # type: ignore[arg-type]
        ranker,
        similar,
        ImpressionSink(),  # type: ignore[arg-type]
        metrics,
    )
    api_server, api_port = recommender_server(api_settings, service, health.HealthServicer())
    api_server.start()
    try:
        yield Servers(f"127.0.0.1:{api_port}", model_target, client)
    finally:
        api_server.stop(0)
        client.close()
        model_server.stop(0)


@pytest.fixture(scope="module")
def recommender(servers: Servers) -> Iterator[Any]:
    with grpc.insecure_channel(servers.api_target) as channel:
        yield pb.grpc.RecommenderStub(channel)


def breaks_a_limit(request: Any) -> bool:
    """The reference: whether ``request`` breaks one of LIMITS (as the .proto documents them)."""
    ids = [*request.exclude_item_ids, *request.candidate_item_ids]
    user_id = request.user_id.strip()
    return (
        request.ByteSize() > LIMITS.max_request_bytes
        or not user_id
        or len(user_id) > LIMITS.max_user_id_chars
        or not 0 <= request.k <= LIMITS.max_k
        or len(request.context) > LIMITS.max_context_entries
        or any(len(text) > LIMITS.max_context_chars for pair in request.context.items() for text in pair)
        or len(request.exclude_item_ids) > LIMITS.max_exclude_items
        or len(request.candidate_item_ids) > LIMITS.max_candidate_items
        or any(not item.strip() or len(item.strip()) > LIMITS.max_item_id_chars for item in ids)
    )


item_ids = st.one_of(st.sampled_from(ITEMS), st.text(max_size=30))
recommend_requests = st.builds(
    pb.pb2.RecommendRequest,
    user_id=st.one_of(st.sampled_from(["known", " 7 ", ""]), st.text(max_size=50)),
    k=st.one_of(st.integers(-2, 25), st.integers(-(2**31), 2**31 - 1)),
    exclude_seen=st.booleans(),
    context=st.dictionaries(st.text(max_size=35), st.text(max_size=35), max_size=8),
    exclude_item_ids=st.lists(item_ids, max_size=14),
    candidate_item_ids=st.lists(item_ids, max_size=14),
)


@FUZZ
@given(request=recommend_requests)
@example(request=pb.pb2.RecommendRequest(user_id="u", context={"blob": "x" * 30, "b": "y" * 30, "c": "z" * 30}))
@example(request=pb.pb2.RecommendRequest(user_id="u", exclude_item_ids=["x" * 20] * 12, candidate_item_ids=["1"]))
def test_recommend_answers_ok_exactly_when_the_request_keeps_every_limit(recommender: Any, request: Any) -> None:
    try:
        response = recommender.Recommend(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        assert breaks_a_limit(request), exc.details()
        event("refused")
        return
    event("answered")
    assert not breaks_a_limit(request)
    shown = [item.item_id for item in response.items]
    assert len(shown) <= (request.k or LIMITS.default_k)
    assert not set(shown) & {item.strip() for item in request.exclude_item_ids}
    if request.candidate_item_ids:
        assert set(shown) <= {item.strip() for item in request.candidate_item_ids}


def test_oversized_requests_name_the_limit_and_floods_stop_at_grpcs_limit(recommender: Any) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        recommender.Recommend(pb.pb2.RecommendRequest(user_id="u", context={"a": "b" * 5000}), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"above the limit of {LIMITS.max_request_bytes}" in str(caught.value.details())
    with pytest.raises(grpc.RpcError) as caught:
        recommender.Recommend(pb.pb2.RecommendRequest(user_id="u" * 100_000), timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused before it is parsed
    limits = {"context": LIMITS.max_context_entries, "characters": LIMITS.max_context_chars}
    for fields, limit in (
        ({"context": {str(i): "v" for i in range(7)}}, limits["context"]),
        ({"context": {"surface": "x" * 31}}, limits["characters"]),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            recommender.Recommend(pb.pb2.RecommendRequest(user_id="u", **fields), timeout=CALL_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"above the limit of {limit}" in str(caught.value.details())


@FUZZ
@given(raw=st.binary(max_size=300))
@example(raw=b"\x0a\x02\xff\xfe")  # user_id (field 1) holding bytes that are not UTF-8
def test_bytes_that_are_no_request_are_invalid_argument_at_both_servers(servers: Servers, raw: bytes) -> None:
    for target, method in (
        (servers.api_target, "/streamrec.v1.Recommender/Recommend"),
        (servers.model_target, "/tensorflow.serving.PredictionService/Predict"),
    ):
        with grpc.insecure_channel(target) as channel:
            try:
                channel.unary_unary(method)(raw, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as exc:
                assert exc.code() in CLIENT_CODES, (method, exc.code(), exc.details())


CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
SIGNATURE_INPUTS = sorted({*INPUTS, "exclude_items", "item_ids", "item_id"})
DTYPES = [*types_pb2.DataType.values(), 77, 1000]


@st.composite
def tensors(draw: st.DrawFn) -> tensor_pb2.TensorProto:
    """Any TensorProto: real and unknown dtypes, shapes small, negative or enormous, values that
    fit the shape or not, raw content of any length."""
    proto = tensor_pb2.TensorProto(dtype=draw(st.sampled_from(DTYPES)))
    dims = draw(st.lists(st.one_of(st.integers(-1, 4), st.integers(-(2**62), 2**62)), max_size=3))
    for size in dims:
        proto.tensor_shape.dim.add().size = size
    proto.tensor_shape.unknown_rank = draw(st.booleans()) and draw(st.booleans())
    filler = draw(st.sampled_from(["string_val", "int64_val", "float_val", "tensor_content", "none"]))
    if filler == "string_val":
        proto.string_val.extend(draw(st.lists(st.binary(max_size=8), max_size=6)))
    elif filler == "int64_val":
        proto.int64_val.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6)))
    elif filler == "float_val":
        proto.float_val.extend(draw(st.lists(st.floats(width=32), max_size=6)))
    elif filler == "tensor_content":
        proto.tensor_content = draw(st.binary(max_size=64))
    return proto


predict_requests = st.builds(
    lambda name, signature, label, inputs: _predict_request(name, signature, label, inputs),
    name=st.sampled_from([contracts.MODEL_NAME, "", "other"]),
    signature=st.sampled_from(
        [contracts.RECOMMEND_SIGNATURE, contracts.SCORE_SIGNATURE, contracts.SIMILAR_SIGNATURE, "", "nope"]
    ),
    label=st.sampled_from([None, contracts.STABLE_LABEL, "missing"]),
    inputs=st.dictionaries(st.sampled_from(SIGNATURE_INPUTS) | st.text(max_size=8), tensors(), max_size=8),
)


def _predict_request(
    name: str, signature: str, label: str | None, inputs: dict[str, tensor_pb2.TensorProto]
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if label is not None:
        request.model_spec.version_label = label
    for alias, tensor in inputs.items():
        request.inputs[alias].CopyFrom(tensor)
    return request


@pytest.fixture(scope="module")
def predictor(servers: Servers) -> Iterator[Any]:
    with grpc.insecure_channel(servers.model_target) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


@FUZZ
@given(request=predict_requests)
def test_predict_answers_random_requests_with_a_clear_client_code(predictor: Any, request: Any) -> None:
    try:
        predictor.Predict(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())
        event(exc.code().name)
        return
    event("OK")


@st.composite
def fitting_tensors(draw: st.DrawFn, spec: Any) -> tensor_pb2.TensorProto:
    """A tensor of the input's dtype with a shape near its spec (a free dimension 0 to 3, a fixed
    one sometimes off by one) and any values: requests that reach the model's graph."""
    dims = []
    for dim in spec.tensor_shape.dim:
        fixed = dim.size if dim.size >= 0 else draw(st.integers(0, 3))
        dims.append(draw(st.sampled_from([fixed, fixed, fixed, fixed + 1])))
    count = math.prod(dims)
    proto = tensor_pb2.TensorProto(dtype=spec.dtype)
    for size in dims:
        proto.tensor_shape.dim.add().size = size
    if spec.dtype == types_pb2.DT_STRING:
        proto.string_val.extend(draw(st.lists(st.binary(max_size=12), min_size=count, max_size=count)))
    elif spec.dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        field = proto.float_val if spec.dtype == types_pb2.DT_FLOAT else proto.double_val
        field.extend(draw(st.lists(st.floats(width=32), min_size=count, max_size=count)))
    else:
        proto.int64_val.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=count, max_size=count)))
    return proto


@FUZZ
@given(data=st.data())
def test_predict_answers_well_formed_random_inputs_or_names_what_is_wrong(
    predictor: Any, servers: Servers, data: st.DataObject
) -> None:
    signatures = servers.client.metadata(label=contracts.STABLE_LABEL).signatures
    name = data.draw(st.sampled_from(sorted(n for n in signatures if not n.startswith("__"))))
    inputs = {alias: data.draw(fitting_tensors(spec)) for alias, spec in signatures[name].inputs.items()}
    request = _predict_request(contracts.MODEL_NAME, name, contracts.STABLE_LABEL, inputs)
    try:
        predictor.Predict(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        event("INVALID_ARGUMENT")
        return
    event("OK")


def test_predict_refuses_enormous_shapes_and_oversized_messages(predictor: Any, servers: Servers) -> None:
    request = _predict_request(contracts.MODEL_NAME, contracts.RECOMMEND_SIGNATURE, None, {})
    one_value = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    one_value.tensor_shape.dim.add().size = MAX_TENSOR_ELEMENTS + 1  # a few bytes asking for 64 MiB
    request.inputs["segment"].CopyFrom(one_value)
    with pytest.raises(grpc.RpcError) as caught:
        predictor.Predict(request, timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"above the limit of {MAX_TENSOR_ELEMENTS}" in str(caught.value.details())
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"x" * (2 * 1024 * 1024)])
    request.inputs["segment"].CopyFrom(huge)
    with pytest.raises(grpc.RpcError) as caught:
        predictor.Predict(request, timeout=CALL_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # grpc_max_message_mb=1
    # the server still answers a valid request after all of the above
    version, outputs = servers.client.predict(
        {"item_id": [b"1"], "exclude_items": [[b""]]}, signature=contracts.SIMILAR_SIGNATURE, label="stable"
    )
    assert version == 1 and not math.isnan(float(outputs["scores"][0][0]))
