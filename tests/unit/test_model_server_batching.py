"""Request batching in the local model server (``serving.model_server.batching``): concurrent
Predicts merged into one model call give each request exactly its own answer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from serving.model_server.batching import BatchingOptions, SignatureBatcher, batchable, fixed_trailing_dims
from serving.model_server.versions import LoadedVersion
from serving.protocol.errors import InvalidArgument
from tests.support.tiny_model import write_tiny_model


class _RowModel:
    """Row-wise: ``out[i] = sum(x[i]) * 10 + len(x[i])``; slow enough for requests to queue."""

    def __init__(self, delay_s: float = 0.05, bad: float | None = None) -> None:
        self.delay_s, self.bad = delay_s, bad
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        with self.lock:
            self.calls.append(x.shape[0])
        time.sleep(self.delay_s)
        if self.bad is not None and (x == self.bad).any():
            raise InvalidArgument(f"value {self.bad} is not allowed")
        return {"y": x.sum(axis=1) * 10 + x.shape[1]}


def _concurrently(batcher: SignatureBatcher, requests: list[np.ndarray]) -> list[object]:
    def one(x: np.ndarray) -> object:
        try:
            return batcher.run({"x": x})["y"]
        except InvalidArgument as exc:
            return exc

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_rows() -> None:
    model = _RowModel()
    batcher = SignatureBatcher(model, BatchingOptions(max_batch_size=8), pad=False)
    requests = [np.full((1 + i % 2, 3), float(i)) for i in range(12)]
    answers = _concurrently(batcher, requests)
    for x, y in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(y, x.sum(axis=1) * 10 + 3)
    assert sum(model.calls) == sum(len(x) for x in requests)
    assert len(model.calls) < len(requests)  # some calls carried several requests
    assert max(model.calls) <= 8


def test_inputs_of_other_lengths_are_padded_with_their_first_element_only_when_outputs_are_fixed() -> None:
    """Padding repeats a tensor's first element (TF Serving's pad_variable_length_inputs): an
    exclusion list keeps its meaning. Without fixed output shapes nothing is padded."""
    padded_calls: list[tuple[int, ...]] = []

    def exclusion(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        padded_calls.append(x.shape)
        time.sleep(0.05)
        return {"y": np.array([len(set(row)) for row in x])}  # distinct ids: padding changes nothing

    requests = [np.array([["a", "b", "c"][: 1 + i % 3]], dtype=object) for i in range(9)]
    batcher = SignatureBatcher(exclusion, BatchingOptions(max_batch_size=16), pad=True)
    answers = _concurrently(batcher, requests)
    assert [int(y[0]) for y in answers] == [len(x[0]) for x in requests]  # type: ignore[index]
    assert any(shape[0] > 1 and shape[1] == 3 for shape in padded_calls)

    def width(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.05)
        return {"y": np.full(len(inputs["x"]), inputs["x"].shape[1])}  # padding would change this

    strict = SignatureBatcher(width, BatchingOptions(max_batch_size=16), pad=False)
    answers = _concurrently(strict, requests)
    assert [int(y[0]) for y in answers] == [len(x[0]) for x in requests]  # type: ignore[index]


def test_a_bad_request_fails_alone_when_its_batch_fails() -> None:
    model = _RowModel(bad=5.0)
    batcher = SignatureBatcher(model, BatchingOptions(max_batch_size=16), pad=False)
    requests = [np.full((1, 2), float(i)) for i in range(8)]
    answers = _concurrently(batcher, requests)
    for i, answer in enumerate(answers):
        if i == 5:
            assert isinstance(answer, InvalidArgument)
        else:
            np.testing.assert_array_equal(answer, [i * 2 * 10 + 2])


def test_a_timeout_lets_a_batch_fill_and_a_lone_request_waits_at_most_that() -> None:
    model = _RowModel(delay_s=0.0)
    batcher = SignatureBatcher(model, BatchingOptions(max_batch_size=4, batch_timeout_micros=200_000), pad=False)
    _concurrently(batcher, [np.ones((1, 2))] * 4)
    assert model.calls == [4]  # the first waited for the other three
    model.calls.clear()
    started = time.monotonic()
    batcher.run({"x": np.ones((1, 2))})
    assert model.calls == [1] and time.monotonic() - started < 5.0


def test_only_signatures_with_a_leading_batch_dimension_everywhere_are_batched() -> None:
    assert batchable({"x": (None, 3)}, {"y": (None,)})
    assert not batchable({"x": (4, 3)}, {"y": (None,)})
    assert not batchable({"x": (None, 3)}, {"y": ()})
    assert not batchable({"x": None}, {"y": (None,)})
    assert fixed_trailing_dims({"ids": (None, 100), "scores": (None, 100)})
    assert not fixed_trailing_dims({"scores": (None, None)})


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("batching") / "streamrec"
    write_tiny_model(base, 1, item_ids=[f"i{n}" for n in range(60)], bias=0.0)
    return base / "1"


def test_batched_predicts_of_a_real_model_answer_as_unbatched_ones(tiny_version: Path) -> None:
    """The tests' two-tower model through ``LoadedVersion``: the same recommend requests, sent
    concurrently with batching and one by one without, get the same items and scores."""
    batched = LoadedVersion("streamrec", 1, tiny_version, BatchingOptions(enabled=True, max_batch_size=8))
    alone = LoadedVersion("streamrec", 1, tiny_version, BatchingOptions(enabled=False))
    batched.load()
    alone.load()
    signature = alone.signatures["recommend"]
    assert signature.batchable

    def request(n: int) -> dict[str, np.ndarray]:
        recent = np.array([[f"i{(n + k) % 60}" for k in range(20)]], dtype=object)
        return {
            "user_id": np.array([f"u{n}"], dtype=object),
            "segment": np.array(["new" if n % 2 else "active"], dtype=object),
            "count_1h": np.array([n % 4], dtype=np.int64),
            "count_24h": np.array([n], dtype=np.int64),
            "tenure_days": np.array([float(n)], dtype=np.float32),
            "recent_items": recent,
            "exclude_items": np.array([[f"i{m}" for m in range(n % 5 + 1)]], dtype=object),
        }

    requests = [request(n) for n in range(24)]
    expected = [alone.run("recommend", signature, r, []) for r in requests]
    calls_before, requests_before = _batch_counts()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: batched.run("recommend", batched.signatures["recommend"], r, []), requests))
    calls_after, requests_after = _batch_counts()
    calls, merged_requests = calls_after - calls_before, requests_after - requests_before
    assert merged_requests == len(requests) and calls < len(requests)  # some calls carried several
    for want, got in zip(expected, answers, strict=True):
        np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)


def _batch_counts() -> tuple[float, float]:
    """(model calls, requests) counted by ``streamrec_model_server_batch_requests`` so far."""
    calls = REGISTRY.get_sample_value("streamrec_model_server_batch_requests_count") or 0.0
    requests = REGISTRY.get_sample_value("streamrec_model_server_batch_requests_sum") or 0.0
    return calls, requests
