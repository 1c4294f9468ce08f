"""SimilarItems end to end: real gRPC, the local model server's tiny models (``similar`` signature),
the trending list from Feast on the stack's Redis.

The tiny model's neighbours are computed by hand (``tests.support.tiny_model.expected_similar``:
``e_i . e_j`` of its fixed item embeddings, plus the version's bias); the trending fallback is
written out from the stats ``set_up_features`` pushes (``TRENDING_TOP`` first, then the feature
store's catalog in order). Items 61..80 are in the feature store's catalog but not the model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from serving.api.proto import generated
from serving.api.server import ApiServer
from serving.api.settings import ApiSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from tests.integration.test_api_server import (
    BIAS,
    CATALOG,
    MODEL_ITEMS,
    TRENDING_TOP,
    ModelStack,
    make_settings,
    series_value,
    set_up_features,
    start_model_server,
    version_of,
)
from tests.support.tiny_model import expected_similar

pb = generated()
STABLE_BIAS = BIAS[version_of("stable")]


def trending_order(exclude: set[str]) -> list[str]:
    """The trending list as set up: the fresh stats' items first, then the catalog (no fresh stats) in order."""
    ordered = [*TRENDING_TOP, *(item for item in CATALOG if item not in TRENDING_TOP)]
    return [item for item in ordered if item not in exclude]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelStack]:
    stack = start_model_server(Path(tmp_path_factory.mktemp("similar-models")) / "streamrec", BIAS)
    yield stack
    stack.server.stop(0)


@pytest.fixture(scope="module")
def api(
    local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory, models: ModelStack
) -> Iterator[ApiServer]:
    state_dir = Path(tmp_path_factory.mktemp("similar-state"))
    settings: ApiSettings = make_settings(stack_settings, state_dir, f"sim{state_dir.name[-6:]}", models.target)
    ensure_topics(settings)
    set_up_features(settings)
    server = ApiServer(settings)
    server.start()
    yield server
    server.stop(1)


@pytest.fixture(scope="module")
def stub(api: ApiServer) -> Iterator[object]:
    with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
        yield pb.grpc.RecommenderStub(channel)


def similar(stub: object, item_id: str, k: int = 5, exclude: list[str] | None = None) -> object:
    request = pb.pb2.SimilarItemsRequest(item_id=item_id, k=k, exclude_item_ids=exclude or [])
    return stub.SimilarItems(request, timeout=10)  # type: ignore[attr-defined]


def test_a_known_item_gets_the_stable_models_neighbours_without_itself_or_the_exclusions(stub: object) -> None:
    nearest = [item for item, _ in expected_similar(MODEL_ITEMS, "5", bias=STABLE_BIAS, k=6)]
    assert [item.item_id for item in similar(stub, "5", k=6).items] == nearest
    exclude = [nearest[0], nearest[2]]  # excluded ids the model would otherwise return first and third
    response = similar(stub, "5", k=6, exclude=exclude)
    expected = expected_similar(MODEL_ITEMS, "5", exclude=exclude, bias=STABLE_BIAS, k=6)
    assert [item.item_id for item in response.items] == [item for item, _ in expected]
    assert [item.score for item in response.items] == pytest.approx([score for _, score in expected], abs=1e-4)
    assert not {"5", *exclude} & {item.item_id for item in response.items}
    assert (response.model_version, response.fallback, response.fallback_reason) == (version_of("stable"), False, "")


def test_an_item_the_model_does_not_know_gets_trending_items_marked_item_unknown(stub: object, api: ApiServer) -> None:
    def unknown_fallbacks() -> float:
        return series_value(
            api, api.metrics.similar_fallbacks, "streamrec_api_similar_fallbacks_total", reason="item_unknown"
        )

    before = unknown_fallbacks()
    response = similar(stub, "70", k=4, exclude=["40"])  # in the feature catalog, not the model's
    assert [item.item_id for item in response.items] == trending_order({"70", "40"})[:4]
    assert (response.fallback, response.fallback_reason, response.model_version) == (True, "item_unknown", 0)
    # the trending list holds the item itself: it is never returned as similar to itself
    assert "50" not in [item.item_id for item in similar(stub, "50", k=3).items]
    assert [item.item_id for item in similar(stub, "no-such-item", k=2).items] == trending_order(set())[:2]
    assert unknown_fallbacks() == before + 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"item_id": ""}, "item_id is empty"),
        ({"item_id": "5", "k": -1}, "k must be positive"),
        ({"item_id": "5", "k": 51}, "k must be at most 50"),
        ({"item_id": "x" * 257}, "item_id has 257 characters"),
        ({"item_id": "5", "exclude_item_ids": ["6", " "]}, "exclude_item_ids[1] is empty"),
    ],
)
def test_bad_requests_get_invalid_argument_with_a_message(
    stub: object, api: ApiServer, fields: dict[str, object], message: str
) -> None:
    before = series_value(
        api, api.metrics.similar_errors, "streamrec_api_similar_errors_total", code="INVALID_ARGUMENT"
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.SimilarItems(pb.pb2.SimilarItemsRequest(**fields), timeout=10)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    after = series_value(api, api.metrics.similar_errors, "streamrec_api_similar_errors_total", code="INVALID_ARGUMENT")
    assert after == before + 1


def test_each_call_is_timed(stub: object, api: ApiServer) -> None:
    def timed() -> float:
        value = api.metrics.registry.get_sample_value("streamrec_api_similar_request_seconds_count")
        assert value is not None
        return value

    before = timed()
    similar(stub, "7", k=1)
    assert timed() == before + 1
