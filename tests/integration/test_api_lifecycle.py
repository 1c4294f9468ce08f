"""The API when things go wrong or end: a stopped or hung model server, shutdown, SIGTERM.

Each test builds its own API (and model server when it needs one) on the module's feature
store, because each ends with something stopped.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.api.proto import SERVICE_NAME, generated
from serving.api.server import ApiServer
from serving.api.settings import ApiSettings
from streamrec.core.settings import PROJECT_ROOT
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from tests.integration.test_api_server import (
    TRENDING_TOP,
    make_settings,
    series_value,
    set_up_features,
    start_model_server,
)

pb = generated()


@pytest.fixture(scope="module")
def features_settings(
    local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ApiSettings, Path]:
    """Feature store and topics set up once; tests derive their settings from it."""
    state_dir = Path(tmp_path_factory.mktemp("api-lifecycle"))
    settings = make_settings(stack_settings, state_dir, f"apilc{os.getpid()}", "127.0.0.1:1")
    ensure_topics(settings)
    set_up_features(settings)
    return settings, state_dir


def with_model(settings: ApiSettings, target: str, *, model_budget_ms: int | None = None, **api: object) -> ApiSettings:
    """``settings`` on the model server at ``target``, with a model budget and ``api`` fields changed."""
    host, port = target.rsplit(":", 1)
    budget = {"request_timeout_ms": model_budget_ms} if model_budget_ms is not None else {}
    model_server = settings.model_server.model_copy(update={"host": host, "port": int(port), **budget})
    return settings.model_copy(update={"model_server": model_server, "api": settings.api.model_copy(update=api)})


class HungPredictions(prediction_service_pb2_grpc.PredictionServiceServicer):
    """A model server stuck past any budget: each ``Predict`` waits until :meth:`release`, then
    fails UNAVAILABLE. The test sees each call arrive, so it knows when the API is waiting on it.

    (A port that accepts TCP and never speaks gRPC is not enough: the model client's connection
    attempt times out after its 100 ms minimum reconnect backoff, ``serving.model_rpc``, and its
    calls then fail at once, so no budget or deadline is ever waited on.)
    """

    def __init__(self) -> None:
        self.target = ""
        self._arrived = threading.Condition()
        self._count = 0
        self._released = threading.Event()

    def Predict(self, request: object, context: grpc.ServicerContext) -> object:  # noqa: N802 - gRPC's name
        with self._arrived:
            self._count += 1
            self._arrived.notify_all()
        self._released.wait(timeout=60)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released by the test")

    def wait_for_calls(self, count: int, timeout_s: float = 30) -> None:
        with self._arrived:
            if not self._arrived.wait_for(lambda: self._count >= count, timeout=timeout_s):
                raise AssertionError(f"{self._count} of {count} Predict calls arrived within {timeout_s} s")

    def release(self) -> None:
        self._released.set()


@pytest.fixture
def hung_model_server() -> Iterator[HungPredictions]:
    predictions = HungPredictions()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(predictions, server)
    predictions.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield predictions
    finally:
        predictions.release()
        server.stop(0)


class HungRedis:
    """A port that accepts connections (kept, so they can be counted) and never answers: a hung Redis."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._accepted: list[socket.socket] = []
        self._empty_backlog = threading.Condition()
        self._empty_polls = 0  # accept() calls that found no connection waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self._accepted.append(self._listener.accept()[0])
            except TimeoutError:
                with self._empty_backlog:
                    self._empty_polls += 1
                    self._empty_backlog.notify_all()

    def connections(self, timeout_s: float = 30) -> int:
        """Connections made so far, counted once the accept loop has found the backlog empty after
        this call (two empty polls: the first may have begun before it), so none is still queued."""
        with self._empty_backlog:
            target = self._empty_polls + 2
            if not self._empty_backlog.wait_for(lambda: self._empty_polls >= target, timeout=timeout_s):
                raise AssertionError(f"the hung Redis's accept loop stalled for {timeout_s} s")
            return len(self._accepted)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for connection in self._accepted:
            connection.close()
        self._listener.close()


@pytest.fixture
def hung_redis() -> Iterator[HungRedis]:
    redis = HungRedis()
    try:
        yield redis
    finally:
        redis.close()


def call(port: int, user_id: str, timeout: float, k: int = 3) -> object:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb.grpc.RecommenderStub(channel)
        return stub.Recommend(pb.pb2.RecommendRequest(user_id=user_id, k=k), timeout=timeout)


def test_a_stopped_model_server_gives_degraded_trending_answers(features_settings: tuple[ApiSettings, Path]) -> None:
    settings, state_dir = features_settings
    models = start_model_server(state_dir / "stopped-models" / "streamrec", {1: 0.0})
    api = ApiServer(with_model(settings, models.target))
    port = api.start()
    try:
        assert call(port, "1", timeout=10).fallback is False
        models.server.stop(0)
        for _ in range(5):  # the model client's reconnect backoff must not turn into errors either
            response = call(port, "1", timeout=10)
            assert (response.fallback, response.degraded, response.fallback_reason) == (True, True, "model_unavailable")
            assert response.model_version == 0
            assert [item.item_id for item in response.items] == TRENDING_TOP
    finally:
        api.stop(0)


def test_a_hung_model_server_costs_the_model_budget_not_the_clients_deadline(
    features_settings: tuple[ApiSettings, Path], hung_model_server: HungPredictions
) -> None:
    settings, _ = features_settings
    api = ApiServer(with_model(settings, hung_model_server.target, model_budget_ms=1_000))
    port = api.start()
    try:
        started = time.monotonic()
        response = call(port, "1", timeout=60)
        elapsed = time.monotonic() - started
        assert (response.degraded, response.fallback_reason) == (True, "model_unavailable")
        hung_model_server.wait_for_calls(1)  # the model was asked, and never answered
        # Waiting on the client's deadline would take 60 s; the bound leaves 15 x the budget for a busy host.
        assert elapsed < 15, f"{elapsed:.1f} s: the API waited on the client's deadline, not its 1 s model budget"
    finally:
        api.stop(0)


def handled(api: ApiServer) -> tuple[float, float]:
    """(calls finished, seconds spent) by the API's handler so far, over every arm."""
    arms = ("stable", "canary", "none")
    calls = sum(series_value(api, api.metrics.latency, "streamrec_api_request_seconds_count", arm=arm) for arm in arms)
    seconds = sum(series_value(api, api.metrics.latency, "streamrec_api_request_seconds_sum", arm=arm) for arm in arms)
    return calls, seconds


def seconds_handling(api: ApiServer, since: tuple[float, float], calls: int, timeout_s: float = 30) -> float:
    """Handler time of ``calls`` calls, once that many more have finished than at ``since``."""
    deadline = time.monotonic() + timeout_s
    while (now := handled(api))[0] - since[0] < calls:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {calls} calls finished in the API within {timeout_s} s")
        time.sleep(0.05)
    return now[1] - since[1]


def test_a_client_deadline_shorter_than_the_model_budget_cuts_the_model_call(
    features_settings: tuple[ApiSettings, Path], hung_model_server: HungPredictions
) -> None:
    """The model call gets what is left of the client's deadline (less a reserve), not the budget,
    and the handler answers from trending. See docs/design/serving.md#the-deadline-reserve."""
    settings, _ = features_settings
    api = ApiServer(with_model(settings, hung_model_server.target, model_budget_ms=60_000))
    port = api.start()
    try:
        before = handled(api)
        try:
            response = call(port, "1", timeout=2)
        except grpc.RpcError as exc:  # the trending answer missed the deadline by the reserve (busy host)
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        else:
            assert (response.degraded, response.fallback_reason) == (True, "model_unavailable")
        hung_model_server.wait_for_calls(1)
        # Waiting on the 60 s budget would keep the handler past this poll's 30 s.
        assert seconds_handling(api, before, calls=1) < 15
    finally:
        api.stop(0)


def feature_store_degraded(api: ApiServer) -> float:
    return series_value(api, api.metrics.degraded, "streamrec_api_degraded_total", dependency="feature_store")


def test_a_hung_feature_store_costs_one_read_timeout_and_no_retries(
    features_settings: tuple[ApiSettings, Path], hung_redis: HungRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py's default policy would reconnect and retry the timed-out read three times, with
    exponential backoff of up to seconds in between, past the client's deadline.

    The degraded counter is read as a difference (``series_value``), and the logged failures are
    attributed to this test's own user ids.
    """
    settings, state_dir = features_settings
    caplog.set_level("INFO")
    models = start_model_server(state_dir / "hung-redis-models" / "streamrec", {1: 0.0})
    hung = with_model(settings, models.target, feature_timeout_ms=50)
    hung = hung.model_copy(update={"redis": hung.redis.model_copy(update={"port": hung_redis.port})})
    api = ApiServer(hung)  # the first trending read times out too: logged, the list stays empty
    port = api.start()
    try:
        degraded_before = feature_store_degraded(api)
        users = [f"hung-redis-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
        for user in users:
            before = hung_redis.connections()
            response = call(port, user, timeout=10)
            assert (response.degraded, response.fallback_reason) == (True, "features_unavailable")
            assert response.model_version == 1 and len(response.items) == 3
            assert hung_redis.connections() - before == 1  # one connection, one timeout, no retry
        failed_reads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("feature read for user")]
        assert [sum(repr(user) in message for message in failed_reads) for user in users] == [1, 1], failed_reads
        assert feature_store_degraded(api) - degraded_before == 2
    finally:
        api.stop(0)
        models.server.stop(0)


def test_shutdown_turns_health_not_serving_and_lets_in_flight_calls_finish(
    features_settings: tuple[ApiSettings, Path], hung_model_server: HungPredictions
) -> None:
    settings, _ = features_settings
    predictions = hung_model_server
    api = ApiServer(with_model(settings, predictions.target, model_budget_ms=60_000))  # calls wait until released
    port = api.start()
    statuses: queue.Queue[str] = queue.Queue()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status == 1  # SERVING

    def watch() -> None:
        updates = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60)
        try:
            for update in updates:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(update.status)
                statuses.put(status)
                if status == "NOT_SERVING":
                    updates.cancel()  # an open Watch would hold the stop for the whole grace period
        except grpc.RpcError:
            statuses.put("closed")

    results: queue.Queue[object] = queue.Queue()

    def in_flight(user: str) -> None:
        try:
            results.put(call(port, user, timeout=60))
        except grpc.RpcError as exc:
            results.put(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert statuses.get(timeout=30) == "SERVING"
    callers = [threading.Thread(target=in_flight, args=(f"user-{i}",)) for i in range(3)]
    for caller in callers:
        caller.start()
    predictions.wait_for_calls(3)  # every call is inside the handler, waiting on the model
    stopper = threading.Thread(target=api.stop, kwargs={"grace_s": 30})
    stopper.start()
    assert statuses.get(timeout=30) == "NOT_SERVING"
    predictions.release()  # only now, so the calls were in flight when the shutdown began
    for caller in callers:
        caller.join(timeout=30)
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    answers = [results.get_nowait() for _ in callers]
    assert all(not isinstance(answer, Exception) and answer.degraded for answer in answers), answers
    with pytest.raises(grpc.RpcError) as refused:
        call(port, "late", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    watcher.join(timeout=30)
    channel.close()


def test_python_m_serving_serves_and_exits_cleanly_on_sigterm(
    features_settings: tuple[ApiSettings, Path], hung_model_server: HungPredictions, tmp_path: Path
) -> None:
    settings, _ = features_settings
    model_host, model_port = hung_model_server.target.rsplit(":", 1)
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
    env.update(
        {
            "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "STREAMREC_REDIS__PORT": str(settings.redis.port),
            "STREAMREC_PATHS__STATE_DIR": str(settings.paths.state_dir),
            "STREAMREC_FEATURES__PROJECT": settings.features.project,
            "STREAMREC_TOPICS__IMPRESSIONS": settings.topics.impressions,
            "STREAMREC_MODEL_SERVER__HOST": model_host,
            "STREAMREC_MODEL_SERVER__PORT": model_port,
            "STREAMREC_MODEL_SERVER__REQUEST_TIMEOUT_MS": "100",
        }
    )
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    api_port = port.getsockname()[1]
    port.close()
    # The log goes to a file, not a pipe: a pipe nobody reads after start-up fills up and blocks
    # the process on its next log line, which would look like a hung shutdown.
    log_path = tmp_path / "api.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", str(api_port), "--metrics-port", "0"],
            cwd=PROJECT_ROOT,
            env=env,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 90
        while "listening on" not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "listening on" in log_path.read_text(), log_path.read_text()[-3000:]
        response = call(api_port, "1", timeout=10)
        assert response.degraded and len(response.items) == 3
        process.send_signal(signal.SIGTERM)
        # Longer than the API's own bound (grace + shutdown timeout), past which it dumps its stacks.
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            returncode = None
        assert returncode == 0, f"exit code {returncode}; the API's log ends:\n{log_path.read_text()[-6000:]}"
        assert "Recommender API stopped" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
