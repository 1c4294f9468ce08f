"""The feedback loop on real services: API -> impressions, users -> clicks, the Faust joiner ->
labeled examples, the evaluator -> promote / roll back through the model server's labels.

Users are scripted so the outcome is known: every visit wants one of ``LIKED`` items and clicks
it if shown. The tiny model ranks a cold user's list by item order (``tests.support.tiny_model``),
so a version's click-through rate is set by where its catalog order puts the liked items:

* v1 (stable): half of the liked items in its top 10 -> CTR about 0.5;
* v2 ("random weights"): a random catalog order -> few liked items in the top 10;
* v3 ("trained on more data"): every liked item in its top 10 -> CTR about 1.

v2 published as canary must be rolled back, v3 must be promoted, and stable must keep serving
throughout with zero failed requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from confluent_kafka import Consumer, Producer

from features import store as feature_store
from features.settings import FeatureStoreTuning
from serving.ab.evaluator import AbEvaluator
from serving.ab.policy import PolicyConfig
from serving.api.proto import generated
from serving.api.server import ApiServer
from serving.api.settings import ApiSection, ApiSettings
from serving.model_client import ModelServerClient
from serving.model_server.server import ModelServer, ServerOptions
from serving.settings import ModelServerSection
from streamrec import contracts
from streamrec.consume import consumer_config
from streamrec.events import Click, LabeledExample, decode_event
from streamrec.settings import CommonSettings, PathSettings
from tests.support.processes import faust_worker, settings_env
from tests.support.tiny_model import write_tiny_model

ITEMS = [str(i) for i in range(1, 61)]
LIKED = [str(i) for i in range(1, 11)]
OTHERS = [item for item in ITEMS if item not in LIKED]
K = 10


def catalog_order(version: int) -> list[str]:
    if version == 1:
        return LIKED[:5] + OTHERS[:5] + LIKED[5:] + OTHERS[5:]
    if version == 2:
        return [str(item) for item in np.random.default_rng(2).permutation([int(i) for i in ITEMS])]
    return LIKED + OTHERS


def test_bad_canary_is_rolled_back_and_better_canary_promoted(fresh_settings: CommonSettings, tmp_path: Path) -> None:
    base_path = tmp_path / "models" / contracts.MODEL_NAME
    for version in (1, 2, 3):
        write_tiny_model(base_path, version, item_ids=catalog_order(version))
    model_server = ModelServer(
        ServerOptions(
            host="127.0.0.1",
            port=0,
            model_name=contracts.MODEL_NAME,
            model_base_path=base_path,
            file_system_poll_wait_seconds=0.5,
        )
    ).start()
    target = f"127.0.0.1:{model_server.port}"
    admin = ModelServerClient(target, server_base_path=str(base_path), config_file=tmp_path / "models.config")
    admin.publish_stable(1)
    settings = ApiSettings(
        kafka=fresh_settings.kafka,
        redis=fresh_settings.redis,
        topics=fresh_settings.topics,
        paths=PathSettings(state_dir=tmp_path),
        model_server=ModelServerSection(host="127.0.0.1", port=model_server.port, request_timeout_ms=500),
        api=ApiSection(port=0, metrics_port=0, canary_share=0.5, canary_recheck_s=0.5, experiment_salt="e2e"),
        features=FeatureStoreTuning(project=f"e2e{uuid.uuid4().hex[:8]}"),
    )
    feature_store.write_profiles(settings)
    store = feature_store.open_store(settings)
    feature_store.apply(store)
    feature_store.materialize_profiles(store)
    api = ApiServer(settings)
    api_port = api.start()
    stubs = generated()
    channel = grpc.insecure_channel(f"127.0.0.1:{api_port}")
    stub = stubs.grpc.RecommenderStub(channel)
    producer = Producer(fresh_settings.kafka.client_config())
    evaluator = AbEvaluator(admin, PolicyConfig(min_trials=150), tmp_path / "evaluator")
    rng = np.random.default_rng(0)
    failures: list[str] = []
    served_versions: set[tuple[str, int]] = set()

    def visit(index: int) -> None:
        user = f"e2e-user-{index % 500}"
        try:
            response = stub.Recommend(stubs.pb2.RecommendRequest(user_id=user, k=K), timeout=2.0)
        except grpc.RpcError as error:
            failures.append(f"{error.code()}: {error.details()}")
            return
        served_versions.add((response.arm, response.model_version))
        wanted = str(rng.choice(LIKED))
        shown = [item.item_id for item in response.items]
        if wanted in shown:
            click = Click(
                event_id=f"c-{response.request_id}",
                event_time=datetime.now(UTC),
                user_id=user,
                request_id=response.request_id,
                item_id=wanted,
                position=shown.index(wanted),
            )
            producer.produce(fresh_settings.topics.clicks, key=click.key(), value=click.to_bytes())
        producer.poll(0)

    labeled = Consumer(consumer_config(fresh_settings, f"eval-{uuid.uuid4().hex}", from_beginning=True))
    labeled.subscribe([fresh_settings.topics.labeled])
    counter = iter(range(10**9))

    def run_until(done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _ in range(40):
                visit(next(counter))
            producer.flush(5)
            evaluator.refresh_labels()
            for message in labeled.consume(num_messages=5000, timeout=0.3):
                evaluator.handle(decode_event(message.value(), LabeledExample))
            evaluator.decide()
            if done():
                return
        raise AssertionError(f"no decision within {timeout_s}s; figures {evaluator.figures()}")

    env = settings_env(
        fresh_settings,
        STREAMREC_JOINER__APP_ID=f"joiner-{uuid.uuid4().hex[:8]}",
        STREAMREC_JOINER__LABEL_WINDOW_S="1",
        STREAMREC_JOINER__GRACE_S="0.5",
        STREAMREC_JOINER__EXPIRE_INTERVAL_S="0.2",
    )
    try:
        with faust_worker("streams.joiner_app", env, tmp_path / "joiner.log"):
            admin.publish_canary(2)
            run_until(lambda: admin.labels().get("canary") == 1, timeout_s=150)
            assert evaluator.rejected_versions() == [2]
            admin.publish_canary(3)
            run_until(lambda: admin.labels().get("stable") == 3, timeout_s=150)
    finally:
        labeled.close()
        channel.close()
        api.stop(1)
        model_server.stop(0)
        admin.close()
    decisions = (tmp_path / "evaluator" / "decisions.jsonl").read_text().splitlines()
    assert [line.split('"action": "')[1].split('"')[0] for line in decisions] == ["rollback", "promote"]
    assert failures == []
    assert ("stable", 1) in served_versions and ("canary", 2) in served_versions and ("canary", 3) in served_versions
