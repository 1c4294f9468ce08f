"""Recommend calls back to back from a few threads, every answer and error counted: the load
the fault tests keep on the API while they break something under it."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc

from serving.api.proto import generated
from serving.api.server import ApiServer
from streamrec.core.settings import CommonSettings
from streamrec.ops.stack.local_stack import LocalStack
from tests.integration.test_api_server import FRESH_USER, make_settings, set_up_features

pb = generated()


def start_api_on_cluster(stack: LocalStack, client: CommonSettings, state_dir: Path, model_target: str) -> ApiServer:
    """An API on ``stack``'s Redis (the tiny feature set of the API tests) that logs impressions to
    ``client``'s brokers and topics, scoring on the model server at ``model_target``; started."""
    settings = make_settings(stack.settings, state_dir, f"api{uuid.uuid4().hex[:6]}", model_target)
    settings = settings.model_copy(update={"kafka": client.kafka, "topics": client.topics})
    set_up_features(settings)
    api = ApiServer(settings)
    api.start()
    return api


class RecommendLoad:
    """Threads calling Recommend back to back; every answer or error is counted."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.answers: Counter[str] = Counter()
        self.errors: list[str] = []
        self.unmarked_fallbacks = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> RecommendLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb.grpc.RecommenderStub(channel)
            while not self._stop.is_set():
                try:
                    response = stub.Recommend(pb.pb2.RecommendRequest(user_id=FRESH_USER, k=3), timeout=10)
                except grpc.RpcError as error:
                    with self._lock:
                        self.errors.append(f"{error.code()}: {error.details()}")
                    continue
                with self._lock:
                    key = f"fallback:{response.fallback_reason}" if response.fallback else f"v{response.model_version}"
                    self.answers[key] += 1
                    if response.fallback and not response.degraded:
                        self.unmarked_fallbacks += 1
                time.sleep(0.005)

    def count(self, key: str) -> int:
        with self._lock:
            return self.answers[key]
