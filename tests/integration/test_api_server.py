"""The recommendation API end to end on loopback: real gRPC, Feast on the stack's Redis, the local
model server with tiny models, impressions on the stack's Kafka, grpcurl through reflection.

One feature store (set up for the tiny model's attribute schema: a categorical and a numeric
user attribute, a multi-categorical item attribute), one model server (v1 = stable, v2 = canary,
with different biases so the arm that served is visible in the scores) and one API serve the
whole module. The tiny model's answers are computed by hand (``tests.support.tiny_model.expected_top``),
so the tests check the actual items, not just their count. Expected arms and feature rows are
written out here from the spec (the salted hash of ``serving.api.arms``' docstring, the users
written below), never computed by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from confluent_kafka import Consumer
from prometheus_client.metrics import MetricWrapperBase

from features import store as feature_store
from features.settings import FeatureStoreTuning
from serving.api.proto import SERVICE_NAME, generated
from serving.api.server import ApiServer, open_feature_store
from serving.api.settings import ApiSection, ApiSettings
from serving.api.user_features import UserFeatureReader, UserFeatures
from serving.model_client import ModelServerClient
from serving.model_server.server import ModelServer, ServerOptions
from serving.settings import ModelServerSection
from streamrec.core import contracts
from streamrec.core.attributes import user_model_inputs
from streamrec.core.events import Impression, decode_event
from streamrec.core.settings import PathSettings, RankingTuning, TopicSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from tests.support.tiny_model import TINY_SCHEMA, expected_scores, expected_similar, expected_top, write_tiny_model
from tests.support.tools import require_tool

pb = generated()
MODEL_ITEMS = [str(i) for i in range(1, 61)]
# The feature store's catalog: the model's items and some it has never seen (61..80).
CATALOG = [str(i) for i in range(1, 81)]
BIAS = {1: 0.0, 2: 5.0}  # v1 serves stable, v2 canary
SALT = "test-salt"
CANARY_SHARE = 0.5
FRESH_USER, FRESH_RECENT = "1", ["1", "2", "3"]
STALE_USER, STALE_RECENT = "2", ["4", "5"]
TRENDING_TOP = ["50", "40", "30"]
INPUTS = user_model_inputs(TINY_SCHEMA)
# The user rows written to the store (TINY_SCHEMA's user attributes); user 3's tenure is unknown.
PROFILES: dict[str, dict[str, object]] = {
    "1": {"segment": "gold", "tenure_days": 400.0},
    "2": {"segment": "new", "tenure_days": 3.0},
    "3": {"segment": "silver", "tenure_days": None},
}
NO_PROFILE: dict[str, object] = {"segment": "", "tenure_days": None}
NO_COUNTS = {"count_1h": 0, "count_24h": 0}


@dataclass
class ModelStack:
    server: ModelServer
    base_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def start_model_server(base_path: Path, versions: dict[int, float]) -> ModelStack:
    """Tiny model versions under ``base_path``; the first is stable, the last canary."""
    for version, bias in versions.items():
        write_tiny_model(base_path, version, item_ids=MODEL_ITEMS, bias=bias)
    server = ModelServer(
        ServerOptions(
            host="127.0.0.1",
            port=0,
            model_name="streamrec",
            model_base_path=base_path,
            file_system_poll_wait_seconds=0.5,
            model_root=base_path.parent,  # the ranking model's versions sit beside the retrieval model's
        )
    ).start()
    with ModelServerClient(f"127.0.0.1:{server.port}", server_base_path=str(base_path)) as admin:
        ordered = sorted(versions)
        admin.publish_stable(ordered[0])
        if len(ordered) > 1:
            admin.publish_canary(ordered[-1])
    return ModelStack(server, base_path)


def make_settings(
    stack_settings: StackSettings, state_dir: Path, project: str, model_target: str, **api: object
) -> ApiSettings:
    host, port = model_target.rsplit(":", 1)
    return ApiSettings(
        kafka=stack_settings.kafka,
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=state_dir),
        topics=TopicSettings(
            **{
                name: f"{project}.{name}"
                for name in TopicSettings().model_dump()
                if name in ("interactions", "impressions", "clicks", "labeled", "deadletter")
            }
        ),
        features=FeatureStoreTuning(project=project, max_feature_age_s=24 * 3600.0),
        # A budget no healthy model call reaches on a busy host; tests of the budget set their own.
        model_server=ModelServerSection(host=host, port=int(port), request_timeout_ms=5_000),
        api=ApiSection(port=0, metrics_port=0, experiment_salt=SALT, canary_share=CANARY_SHARE, **api),  # type: ignore[arg-type]
    )


def set_up_features(settings: ApiSettings) -> None:
    """The tiny schema's profiles materialized; one fresh and one stale activity row; trending stats for a few items."""
    users = pd.DataFrame(
        {
            "user_id": list(PROFILES),
            "segment": [str(row["segment"]) for row in PROFILES.values()],
            "tenure_days": [np.nan if row["tenure_days"] is None else row["tenure_days"] for row in PROFILES.values()],
        }
    )
    items = pd.DataFrame({"item_id": CATALOG, "tags": [[f"tag-{int(item) % 3}"] for item in CATALOG]})
    store = feature_store.open_store(settings)
    feature_store.setup_dataset(store, "api-tiny", TINY_SCHEMA, users, items)
    now = pd.Timestamp.now(tz="UTC")
    stale = now - timedelta(days=3)
    feature_store.push_user_activity(
        store,
        pd.DataFrame(
            {
                "user_id": [FRESH_USER, STALE_USER],
                "recent_items": [FRESH_RECENT, STALE_RECENT],
                "count_1h": [3, 2],
                "count_24h": [5, 2],
                "last_event_ts": [int(now.timestamp()), int(stale.timestamp())],
                "event_timestamp": [now, stale],
            }
        ),
    )
    feature_store.push_item_stats(
        store,
        pd.DataFrame(
            {
                "item_id": [*TRENDING_TOP, "20"],
                "count_1h": [9, 8, 7, 100],
                "count_24h": [9, 8, 7, 100],
                "trending_score": [9.0, 8.0, 7.0, 100.0],  # "20" is stale: it must not trend
                "event_timestamp": [now, now, now, stale],
            }
        ),
    )


@pytest.fixture(scope="module")
def project() -> str:
    return f"api{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("api-state"))


@pytest.fixture(scope="module")
def models(state_dir: Path) -> Iterator[ModelStack]:
    stack = start_model_server(state_dir / "models" / "streamrec", BIAS)
    yield stack
    stack.server.stop(0)


@pytest.fixture(scope="module")
def settings(
    local_stack: object, stack_settings: StackSettings, state_dir: Path, project: str, models: ModelStack
) -> ApiSettings:
    built = make_settings(stack_settings, state_dir, project, models.target)
    ensure_topics(built)
    set_up_features(built)
    return built


@pytest.fixture(scope="module")
def api(settings: ApiSettings) -> Iterator[ApiServer]:
    server = ApiServer(settings)
    server.start()
    yield server
    server.stop(1)


@pytest.fixture(scope="module")
def stub(api: ApiServer) -> Iterator[object]:
    with grpc.insecure_channel(f"127.0.0.1:{api.port}") as channel:
        yield pb.grpc.RecommenderStub(channel)


def recommend(stub: object, user_id: str, k: int = 5, exclude_seen: bool = False, timeout: float = 10.0) -> object:
    request = pb.pb2.RecommendRequest(user_id=user_id, k=k, exclude_seen=exclude_seen)
    return stub.Recommend(request, timeout=timeout)  # type: ignore[attr-defined]


def series_value(api: ApiServer, metric: MetricWrapperBase, sample: str, **labels: str) -> float:
    """``sample`` of ``metric``'s series with ``labels``, created first if new. Tests compare values
    read before and after: in one test process a series starts from what earlier API servers
    counted. See docs/design/serving.md#api-metrics-in-one-test-process."""
    metric.labels(**labels)
    value = api.metrics.registry.get_sample_value(sample, labels)
    assert value is not None, f"no sample {sample}{labels}"
    return value


def nan_as_none(row: dict[str, object]) -> dict[str, object]:
    """``row`` with NaN values as None, so rows with an unknown number compare equal."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()}


def version_of(arm: str) -> int:
    return 2 if arm == "canary" else 1


def expected_arm(user_id: str) -> str:
    """The spec's split: the first 8 bytes of sha256("<salt>:<user_id>") over 2**64 is the user's
    point in [0, 1); points below the canary share are canary."""
    point = int.from_bytes(hashlib.sha256(f"{SALT}:{user_id}".encode()).digest()[:8], "big") / 2**64
    return "canary" if point < CANARY_SHARE else "stable"


def test_recommend_returns_k_items_with_model_version_and_arm(stub: object) -> None:
    response = recommend(stub, FRESH_USER, k=5)
    arm = expected_arm(FRESH_USER)
    version = version_of(arm)
    expected = expected_top(MODEL_ITEMS, FRESH_RECENT, bias=BIAS[version], k=5)
    scores = expected_scores(MODEL_ITEMS, FRESH_RECENT, bias=BIAS[version])
    assert [item.item_id for item in response.items] == expected
    assert [item.position for item in response.items] == [0, 1, 2, 3, 4]
    assert [item.score for item in response.items] == pytest.approx([scores[item] for item in expected], abs=1e-4)
    assert (response.arm, response.model_version) == (arm, version)
    assert (response.fallback, response.degraded, response.fallback_reason) == (False, False, "")
    assert len(response.request_id) == 32
    assert recommend(stub, FRESH_USER).request_id != response.request_id


def test_arms_split_by_the_salted_hash_and_each_arm_is_served_by_its_label(stub: object) -> None:
    users = [f"ab-{i}" for i in range(40)]
    served = {user: recommend(stub, user, k=1) for user in users}
    for user, response in served.items():
        assert response.arm == expected_arm(user)
        assert response.model_version == version_of(response.arm)
    assert {response.arm for response in served.values()} == {"stable", "canary"}


def test_exclude_seen_removes_the_users_recent_items(stub: object) -> None:
    version = version_of(expected_arm(FRESH_USER))
    without = [item.item_id for item in recommend(stub, FRESH_USER, k=10).items]
    assert set(FRESH_RECENT) & set(without)  # the tiny model ranks them high, so the test can fail
    with_exclusion = [item.item_id for item in recommend(stub, FRESH_USER, k=10, exclude_seen=True).items]
    assert not set(FRESH_RECENT) & set(with_exclusion)
    assert with_exclusion == expected_top(MODEL_ITEMS, FRESH_RECENT, exclude=FRESH_RECENT, bias=BIAS[version], k=10)


def test_exclude_item_ids_are_never_returned_and_join_the_seen_items(stub: object) -> None:
    version = version_of(expected_arm(FRESH_USER))
    top = expected_top(MODEL_ITEMS, FRESH_RECENT, bias=BIAS[version], k=4)
    unseen_top = [item for item in top if item not in FRESH_RECENT][:2]
    assert unseen_top  # the model's own top has items the user has not seen, so the test can fail
    request = pb.pb2.RecommendRequest(user_id=FRESH_USER, k=10, exclude_seen=True, exclude_item_ids=unseen_top)
    shown = [item.item_id for item in stub.Recommend(request, timeout=10).items]  # type: ignore[attr-defined]
    exclude = [*FRESH_RECENT, *unseen_top]
    assert shown == expected_top(MODEL_ITEMS, FRESH_RECENT, exclude=exclude, bias=BIAS[version], k=10)


def test_candidate_item_ids_rank_only_the_allow_list_by_the_models_score(stub: object) -> None:
    version = version_of(expected_arm(FRESH_USER))
    scores = expected_scores(MODEL_ITEMS, FRESH_RECENT, bias=BIAS[version])
    # "70" is in the feature catalog but not the model's: the tiny model scores it -inf, so it is left out
    candidates = ["45", "2", "70", "17", "1", "33", "2"]
    request = pb.pb2.RecommendRequest(user_id=FRESH_USER, k=3, exclude_item_ids=["1"], candidate_item_ids=candidates)
    response = stub.Recommend(request, timeout=10)  # type: ignore[attr-defined]
    expected = sorted(["45", "2", "17", "33"], key=lambda item: -scores[item])[:3]
    assert [item.item_id for item in response.items] == expected
    assert [item.score for item in response.items] == pytest.approx([scores[item] for item in expected], abs=1e-4)
    assert (response.model_version, response.fallback) == (version, False)


@pytest.mark.parametrize("one_round_trip", [True, False], ids=["one-hmget", "online-read-per-view"])
def test_the_reader_gives_the_rows_and_features_get_online_features_gives(
    settings: ApiSettings, one_round_trip: bool
) -> None:
    """The API reads the FeatureService's views in one HMGET, or with ``Provider.online_read`` per
    view on other stores (see ``serving.api.user_features``); each must see exactly what Feast's
    public read returns."""
    store = open_feature_store(settings)
    reader = UserFeatureReader(
        store, inputs=INPUTS, max_age_s=settings.feature_max_age_s, one_round_trip=one_round_trip
    )
    assert (reader._hmget is not None) == one_round_trip  # noqa: SLF001 - the path under test
    service = store.get_feature_service("recommender_user_v1")
    profile_only = {"found_views": frozenset({"user_profile"}), "recent_items": [], "counts": NO_COUNTS}
    expected = {  # fresh activity + profile, stale activity + profile, profile only, nothing at all
        FRESH_USER: UserFeatures(
            FRESH_USER,
            PROFILES[FRESH_USER],
            FRESH_RECENT,
            {"count_1h": 3, "count_24h": 5},
            found_views=frozenset({"user_profile", "user_activity"}),
        ),
        STALE_USER: UserFeatures(
            STALE_USER, PROFILES[STALE_USER], **profile_only, stale_views=frozenset({"user_activity"})
        ),
        "3": UserFeatures("3", PROFILES["3"], **profile_only),
        "no-such-user": UserFeatures("no-such-user", NO_PROFILE, [], NO_COUNTS),
    }
    for user, features in expected.items():
        public = store.get_online_features(
            features=service, entity_rows=[{"user_id": user}], full_feature_names=True
        ).to_dict(include_event_timestamps=True)
        public_row = {key: values[0] for key, values in public.items() if not key.startswith("user_id")}
        assert nan_as_none(reader.read_row(user)) == nan_as_none(public_row), user
        assert reader.read(user) == features, user
    assert not reader.read("no-such-user").known


def test_stale_stream_features_count_as_missing(stub: object) -> None:
    response = recommend(stub, STALE_USER, k=10, exclude_seen=True)
    version = version_of(response.arm)
    # the 3-day-old activity row is ignored: no profile-less fallback (the profile is there),
    # nothing excluded, and the scores are those of a user with no recent items
    assert (response.fallback, response.fallback_reason) == (False, "")
    assert [item.item_id for item in response.items] == expected_top(MODEL_ITEMS, [], bias=BIAS[version], k=10)


def test_an_unknown_user_gets_the_profile_less_model_answer_marked_cold_start(stub: object) -> None:
    response = recommend(stub, "never-seen-user", k=3)
    assert (response.fallback, response.fallback_reason, response.degraded) == (True, "cold_start", False)
    version = version_of(response.arm)
    assert response.model_version == version
    assert [item.item_id for item in response.items] == expected_top(MODEL_ITEMS, [], bias=BIAS[version], k=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user_id": "", "k": 3}, "user_id is empty"),
        ({"user_id": "1", "k": -2}, "k must be positive"),
        ({"user_id": "1", "k": 51}, "k must be at most 50"),
        ({"user_id": "1", "k": 3, "context": {"junk": "x" * 70_000}}, "above the limit of 65536"),
        ({"user_id": "1", "exclude_item_ids": ["5", ""]}, "exclude_item_ids[1] is empty"),
        ({"user_id": "1", "candidate_item_ids": [""]}, "candidate_item_ids[0] is empty"),
        ({"user_id": "1", "candidate_item_ids": ["1"] * 1001}, "candidate_item_ids has 1001 ids, above the limit"),
    ],
)
def test_invalid_requests_get_invalid_argument_with_a_message(
    stub: object, api: ApiServer, fields: dict[str, object], message: str
) -> None:
    before = series_value(api, api.metrics.errors, "streamrec_api_errors_total", code="INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Recommend(pb.pb2.RecommendRequest(**fields), timeout=10)  # type: ignore[attr-defined]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert series_value(api, api.metrics.errors, "streamrec_api_errors_total", code="INVALID_ARGUMENT") == before + 1


def test_impressions_land_in_the_topic_and_decode_as_impression(stub: object, settings: ApiSettings) -> None:
    sent = {recommend(stub, user, k=4).request_id: user for user in (FRESH_USER, "imp-a", "imp-b")}
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"api-test-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.topics.impressions])
    found: dict[str, Impression] = {}
    deadline = time.monotonic() + 30
    try:
        while set(sent) - set(found) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            impression = decode_event(message.value(), Impression)
            assert message.key() == impression.user_id.encode()
            found[impression.request_id] = impression
    finally:
        consumer.close()
    assert set(sent) <= set(found), "not every impression arrived within 30 s"
    first = found[next(iter(sent))]
    assert first.user_id == FRESH_USER
    assert [item.position for item in first.items] == [0, 1, 2, 3]
    assert first.model_version == version_of(first.arm)
    assert first.features["recent_items"] == FRESH_RECENT
    assert {name: first.features[name] for name in PROFILES[FRESH_USER]} == PROFILES[FRESH_USER]
    assert (first.fallback, first.degraded) == (False, False)
    assert first.serve_latency_ms is not None and 0 < first.serve_latency_ms < 10_000  # the call's deadline
    for impression in (found[request] for request in sent):  # no exploration here: every item shown for sure
        interleaved = impression.items[0].team is not None
        want = (None, None) if interleaved or impression.fallback else (1.0, False)
        assert {(item.propensity, item.explored) for item in impression.items} == {want}


def test_metrics_count_latency_by_arm_fallbacks_and_the_version_served(stub: object, api: ApiServer) -> None:
    def requests_timed() -> float:
        return sum(
            series_value(api, api.metrics.latency, "streamrec_api_request_seconds_count", arm=arm)
            for arm in ("stable", "canary")
        )

    def cold_starts() -> float:
        return series_value(api, api.metrics.fallbacks, "streamrec_api_fallbacks_total", reason="cold_start")

    timed_before, cold_before = requests_timed(), cold_starts()
    response = recommend(stub, "metrics-new-user", k=2)
    assert (requests_timed(), cold_starts()) == (timed_before + 1, cold_before + 1)
    model_version = api.metrics.registry.get_sample_value("streamrec_api_model_version", {"arm": response.arm})
    assert model_version == response.model_version


def test_trending_ignores_stale_stats_and_ranks_fresh_ones_first(api: ApiServer) -> None:
    snapshot = api._trending.snapshot if api._trending is not None else None  # noqa: SLF001 - white-box check
    assert snapshot is not None
    assert list(snapshot.item_ids[:3]) == TRENDING_TOP
    assert snapshot.item_ids.index("20") > 3  # its 100.0 score is three days old


def test_grpcurl_lists_the_services_and_calls_recommend_with_json(api: ApiServer) -> None:
    grpcurl = require_tool("grpcurl")
    address = f"127.0.0.1:{api.port}"

    def run(*args: str) -> str:
        result = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    services = run(address, "list").split()
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)
    assert run(address, "list", SERVICE_NAME).split() == [f"{SERVICE_NAME}.Recommend", f"{SERVICE_NAME}.SimilarItems"]
    described = run(address, "describe", SERVICE_NAME)
    assert "rpc Recommend ( .streamrec.v1.RecommendRequest ) returns ( .streamrec.v1.RecommendResponse )" in described
    assert "rpc SimilarItems ( .streamrec.v1.SimilarItemsRequest ) returns ( .streamrec.v1.SimilarItemsResponse )" in (
        described
    )
    answer = json.loads(run("-d", json.dumps({"user_id": FRESH_USER, "k": 3}), address, f"{SERVICE_NAME}/Recommend"))
    assert len(answer["items"]) == 3
    assert answer["arm"] == expected_arm(FRESH_USER)
    assert int(answer["model_version"]) == version_of(answer["arm"])  # int64 is a JSON string
    similar_request = json.dumps({"item_id": "5", "k": 2, "exclude_item_ids": ["6"]})
    similar = json.loads(run("-d", similar_request, address, f"{SERVICE_NAME}/SimilarItems"))
    expected_items = expected_similar(MODEL_ITEMS, "5", exclude=["6"], bias=BIAS[version_of("stable")], k=2)
    assert [item["item_id"] for item in similar["items"]] == [item for item, _ in expected_items]
    assert int(similar["model_version"]) == version_of("stable")
    assert json.loads(run(address, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}


def test_two_stage_serving_orders_the_candidates_by_the_real_ranking_model(
    models: ModelStack, settings: ApiSettings
) -> None:
    """The ranking stage on the real model server: a ranking model that reverses the retrieval
    order (its retrieval weight set to -1) is asked for every retrieved candidate, the answer comes
    in its order within the call's deadline, and the impression logs the retrieval scores and the
    ranking version; without the ranking model the same API serves the retrieval order."""
    from online_trainer.ranker_export import export_ranker
    from online_trainer.ranker_model import build_ranker

    ranker = build_ranker(TINY_SCHEMA)
    ranker.retrieval_weight.assign(-1.0)
    base = models.base_path.parent / contracts.RANKER_MODEL_NAME
    two_stage = settings.model_copy(
        update={
            "ranking": RankingTuning(enabled=True, candidates=len(MODEL_ITEMS)),
            "api": settings.api.model_copy(update={"canary_share": 0.0}),
        }
    )
    server = ApiServer(two_stage)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = generated().grpc.RecommenderStub(channel)
            unranked = recommend(stub, FRESH_USER, k=3)  # no ranking model on the server yet
            scores = expected_scores(MODEL_ITEMS, FRESH_RECENT, bias=BIAS[1])
            assert [item.item_id for item in unranked.items] == expected_top(MODEL_ITEMS, FRESH_RECENT, k=3)
            export_ranker(ranker, base / "1", TINY_SCHEMA)
            # one config file for both models, as the stack's processes share models.config: a
            # reload names the whole config, so the retrieval model's labels go in first
            config = base.parent / "models.config"
            with ModelServerClient(models.target, server_base_path=str(models.base_path), config_file=config) as admin:
                admin.publish_stable(1)
                admin.publish_canary(2)
            with ModelServerClient(
                models.target, contracts.RANKER_MODEL_NAME, server_base_path=str(base), config_file=config
            ) as admin:
                admin.publish_stable(1)
            started = time.monotonic()
            ranked = recommend(stub, FRESH_USER, k=3, timeout=10.0)
            assert time.monotonic() - started < 10.0 and not ranked.degraded and not ranked.fallback
            lowest = sorted(MODEL_ITEMS, key=lambda item: scores[item])[:3]
            assert [item.item_id for item in ranked.items] == lowest, (ranked.items, lowest)
    finally:
        server.stop(1)
    impression = read_impression(two_stage, ranked.request_id)
    assert impression.ranker_version == 1
    best = max(scores[item] for item in MODEL_ITEMS)  # logged relative to the best candidate
    assert [item.retrieval_score for item in impression.items] == pytest.approx(
        [scores[item] - best for item in lowest], abs=1e-3
    )


def read_impression(settings: ApiSettings, request_id: str) -> Impression:
    """The impression of ``request_id`` from the impressions topic (within 30 s)."""
    consumer = Consumer(
        {
            **settings.kafka.client_config(),
            "group.id": f"api-test-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.topics.impressions])
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            impression = decode_event(message.value(), Impression)
            if impression.request_id == request_id:
                return impression
    finally:
        consumer.close()
    raise AssertionError(f"no impression of request {request_id} within 30 s")
