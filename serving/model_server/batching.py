"""Request batching, as TF Serving's ``--enable_batching``: Predicts that arrive while a model
call runs are merged into the next call, and each gets its own rows back.

One :class:`SignatureBatcher` per (version, signature, output filter). There is no batch
thread: the first request that finds no call running runs one itself, taking the queued
requests that fit in ``max_batch_size`` rows (its own always among them, the queue is first in
first out); the others wait for their rows. With ``batch_timeout_micros`` 0 (the default, as
TF Serving's) nobody waits for a batch to fill: batches form only from requests that queued
behind a running call, so a lone request pays nothing.

Only signatures whose every input and output has an unknown batch dimension first are batched
(:func:`batchable`), as TF Serving requires. Inputs whose other dimensions differ between
requests (say, ``exclude_items`` lists of different lengths) are padded with each tensor's first
element, as TF Serving's ``pad_variable_length_inputs`` does, but only when every output's
other dimensions are fixed, so padding cannot change an answer's shape; otherwise such requests
go in separate calls. A merged call that fails is run again request by request, so one bad
request fails alone.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.model_server import metrics

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's ``--enable_batching`` and the batching parameters the local server honours."""

    enabled: bool = False  # as TF Serving's default and serving.settings
    max_batch_size: int = 32  # rows in one model call
    batch_timeout_micros: int = 0  # how long a call waits for more requests before it runs
    pad_variable_length_inputs: bool = True


def batchable(input_shapes: Mapping[str, tuple[int | None, ...] | None], output_shapes: Mapping[str, Any]) -> bool:
    """Every input and output has rank >= 1 and an unknown first (batch) dimension."""
    shapes = [*input_shapes.values(), *(_dims(shape) for shape in output_shapes.values())]
    return all(shape is not None and len(shape) >= 1 and shape[0] is None for shape in shapes)


def fixed_trailing_dims(output_shapes: Mapping[str, Any]) -> bool:
    """Every output's dimensions after the batch one are known (padding inputs cannot change them)."""
    for shape in output_shapes.values():
        dims = _dims(shape)
        if dims is None or any(dim is None for dim in dims[1:]):
            return False
    return True


def _dims(shape: Any) -> tuple[int | None, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, tuple):
        return shape
    if getattr(shape, "rank", 0) is None:  # a TensorShape of unknown rank
        return None
    return tuple(shape.as_list()) if hasattr(shape, "as_list") else tuple(shape)


class _Pending:
    __slots__ = ("done", "error", "inputs", "outputs", "rows")

    def __init__(self, inputs: Arrays, rows: int) -> None:
        self.inputs, self.rows = inputs, rows
        self.outputs: Arrays | None = None
        self.error: BaseException | None = None
        self.done = False


class SignatureBatcher:
    """Merges concurrent calls of ``call`` (inputs -> outputs, rows along the first dimension)."""

    def __init__(self, call: Callable[[Arrays], Arrays], options: BatchingOptions, *, pad: bool) -> None:
        self._call = call
        self.max_rows = options.max_batch_size
        self.timeout_s = options.batch_timeout_micros / 1e6
        self.pad = pad and options.pad_variable_length_inputs
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._running = False

    def run(self, inputs: Arrays) -> Arrays:
        """This request's outputs; raises what its own call would raise."""
        rows = {value.shape[0] for value in inputs.values()}
        if len(rows) != 1 or next(iter(rows)) >= self.max_rows:
            return self._call(inputs)  # ragged batch dims (the model's own error) or already full
        pending = _Pending(inputs, rows.pop())
        with self._cond:
            self._queue.append(pending)
            if self.timeout_s > 0:
                self._cond.notify_all()  # a runner waiting for its batch to fill
        while not pending.done:
            with self._cond:
                while not pending.done and self._running:
                    self._cond.wait()
                if pending.done:
                    break
                self._running = True
            try:
                self._run_next()
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending.outputs or {}

    def _run_next(self) -> None:
        with self._cond:
            if self.timeout_s > 0:
                self._cond.wait_for(lambda: self._queued_rows() >= self.max_rows, timeout=self.timeout_s)
            batch = self._take()
        metrics.BATCH_REQUESTS.observe(len(batch))
        if len(batch) == 1:
            self._settle_alone(batch[0])
            return
        try:
            merged = self._call(self._merge(batch))
            total = sum(p.rows for p in batch)
            if any(value.ndim == 0 or value.shape[0] != total for value in merged.values()):
                raise _NotRowWise
        except Exception:  # noqa: BLE001 -- each request alone: only a bad one fails, with its own error
            for pending in batch:
                self._settle_alone(pending)
            return
        start = 0
        for pending in batch:
            end = start + pending.rows
            pending.outputs = {alias: value[start:end] for alias, value in merged.items()}
            pending.done = True
            start = end

    def _settle_alone(self, pending: _Pending) -> None:
        try:
            pending.outputs = self._call(pending.inputs)
        except Exception as exc:  # noqa: BLE001 -- handed to the waiting request, which raises it
            pending.error = exc
        pending.done = True

    def _queued_rows(self) -> int:
        return sum(pending.rows for pending in self._queue)

    def _take(self) -> list[_Pending]:
        """The first queued request and the later ones that fit beside it (FIFO)."""
        first = self._queue.popleft()
        batch, rows, kept = [first], first.rows, deque[_Pending]()
        while self._queue:
            pending = self._queue.popleft()
            if rows + pending.rows <= self.max_rows and self._compatible(first, pending):
                batch.append(pending)
                rows += pending.rows
            else:
                kept.append(pending)
        self._queue = kept
        return batch

    def _compatible(self, first: _Pending, other: _Pending) -> bool:
        if first.inputs.keys() != other.inputs.keys():
            return False
        for alias, value in first.inputs.items():
            theirs = other.inputs[alias]
            if value.dtype != theirs.dtype or value.ndim != theirs.ndim:
                return False
            if value.shape[1:] != theirs.shape[1:] and not (self.pad and value.size and theirs.size):
                return False
        return True

    def _merge(self, batch: list[_Pending]) -> Arrays:
        merged: Arrays = {}
        for alias in batch[0].inputs:
            parts = [pending.inputs[alias] for pending in batch]
            trailing = tuple(max(part.shape[axis] for part in parts) for axis in range(1, parts[0].ndim))
            merged[alias] = np.concatenate([_padded(part, trailing) for part in parts], axis=0)
        return merged


def _padded(value: np.ndarray, trailing: tuple[int, ...]) -> np.ndarray:
    """``value`` grown to ``trailing`` dimensions after the batch one, filled with its first element."""
    if value.shape[1:] == trailing:
        return value
    out = np.full((value.shape[0], *trailing), value.flat[0], dtype=value.dtype)
    out[tuple(slice(0, size) for size in value.shape)] = value
    return out


class _NotRowWise(Exception):
    """A merged call's output does not have one row per input row."""
