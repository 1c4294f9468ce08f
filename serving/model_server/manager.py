"""One model's versions: which should be served, loading and unloading them, labels.

This is TF Serving's ``FileSystemStoragePathSource`` + ``AspiredVersionsManager`` for one model:

* **Aspired versions.** Each poll lists ``<base_path>`` for all-digit directories and applies the
  model's version policy: ``latest { num_versions: N }`` (the default, N=1), ``all``, or
  ``specific { versions: ... }`` (listed versions that exist on disk). A base path that cannot be
  listed keeps the previous aspired set (a flaky mount must not unload everything).
* **Availability-preserving policy** (TF Serving's default): a new aspired version is loaded
  (newest first) while the old ones keep serving; a version that is no longer aspired is
  unloaded only once an aspired version is AVAILABLE (or nothing is aspired at all). So a
  broken new version leaves the old one serving, and ``latest`` keeps answering.
* **Loads** run on a small thread pool: ``tf.saved_model.load`` plus the warm-up requests, with
  ``max_num_load_retries`` retries ``load_retry_interval_s`` apart; a version that still fails
  ends in state END with the error, which ``GetModelStatus`` reports.
* **Unloads** first make the version unreachable for new requests, then wait for the requests
  already running on it, then drop it (END).
* **Labels** map a name to a version; requests by label resolve under the same lock as requests
  by version, so a label move is atomic for callers.
"""

from __future__ import annotations

import enum
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.batching import BatchingOptions
from serving.model_server.versions import LoadedVersion, LoadError
from serving.protocol.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)


class State(enum.IntEnum):
    """TF Serving's ModelVersionStatus.State numbers."""

    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass
class VersionRecord:
    version: int
    path: Path
    state: State = State.START
    error_code: int = 0
    error_message: str = ""
    loaded: LoadedVersion | None = None
    aspired: bool = True
    history: list[State] = field(default_factory=list)


class ModelManager:
    def __init__(
        self,
        config: model_server_config_pb2.ModelConfig,
        *,
        load_executor: Executor,
        unload_executor: Executor,
        max_num_load_retries: int = 5,
        load_retry_interval_s: float = 60.0,
        batching: BatchingOptions | None = None,
    ) -> None:
        self.name = config.name
        self._batching = batching
        self._config = model_server_config_pb2.ModelConfig()
        self._config.CopyFrom(config)
        self._load_executor = load_executor
        self._unload_executor = unload_executor
        self._max_retries = max_num_load_retries
        self._retry_interval_s = load_retry_interval_s
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._records: dict[int, VersionRecord] = {}
        self._aspired: set[int] = set()
        self._labels: dict[str, int] = {}
        self._stopping = threading.Event()

    # -- config ------------------------------------------------------------------------------
    @property
    def base_path(self) -> Path:
        return Path(self._config.base_path)

    def update_config(self, config: model_server_config_pb2.ModelConfig) -> None:
        """Take a new base path / version policy (labels are set separately, after checking)."""
        with self._lock:
            self._config.CopyFrom(config)

    @property
    def labels(self) -> dict[str, int]:
        with self._lock:
            return dict(self._labels)

    def set_labels(self, labels: dict[str, int]) -> None:
        with self._lock:
            self._labels = dict(labels)

    def version_state(self, version: int) -> State | None:
        with self._lock:
            record = self._records.get(version)
            return record.state if record is not None else None

    # -- polling and the version policy ------------------------------------------------------
    def list_versions(self) -> dict[int, Path] | None:
        """All-digit version directories under the base path; None if it cannot be listed."""
        try:
            entries = list(self.base_path.iterdir())
        except OSError as exc:
            log.warning("cannot list base path %s of model %s: %s", self.base_path, self.name, exc)
            return None
        return {int(entry.name): entry for entry in entries if entry.name.isdigit() and entry.is_dir()}

    def aspired_versions(self, on_disk: dict[int, Path]) -> set[int]:
        policy = self._config.model_version_policy
        choice = policy.WhichOneof("policy_choice")
        if choice == "all":
            return set(on_disk)
        if choice == "specific":
            wanted = set(policy.specific.versions)
            missing = wanted - set(on_disk)
            if missing:
                log.warning("model %s: versions %s of the specific policy are not on disk", self.name, sorted(missing))
            return wanted & set(on_disk)
        count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
        return set(sorted(on_disk, reverse=True)[:count])

    def refresh(self) -> None:
        """One poll: list the base path, update the aspired set, start loads and unloads."""
        on_disk = self.list_versions()
        with self._lock:
            if self._stopping.is_set():
                return
            if on_disk is not None:
                self._aspired = self.aspired_versions(on_disk)
                for version in self._aspired:
                    record = self._records.get(version)
                    if record is None or (record.state == State.END and not record.aspired):
                        self._records[version] = VersionRecord(version, on_disk[version])
                for version, record in self._records.items():
                    record.aspired = version in self._aspired
            self._reconcile()

    def retire(self) -> None:
        """The model left the config: unload every version."""
        with self._lock:
            self._aspired = set()
            self._labels = {}
            for record in self._records.values():
                record.aspired = False
            self._reconcile()

    def _reconcile(self) -> None:
        """TF Serving's AvailabilityPreservingPolicy, applied until nothing changes."""
        records = self._records.values()
        has_aspired = any(r.aspired for r in records)
        aspired_available = any(r.aspired and r.state == State.AVAILABLE for r in records)
        unaspired_available = sorted(
            (r for r in records if not r.aspired and r.state == State.AVAILABLE), key=lambda r: r.version
        )
        while unaspired_available and (not has_aspired or aspired_available or len(unaspired_available) > 1):
            self._start_unload(unaspired_available.pop(0))
        for record in sorted(records, key=lambda r: -r.version):
            if record.aspired and record.state == State.START:
                record.state = State.LOADING
                self._load_executor.submit(self._load, record)
        self._changed.notify_all()

    # -- load / unload -----------------------------------------------------------------------
    def _load(self, record: VersionRecord) -> None:
        attempts = self._max_retries + 1
        for attempt in range(1, attempts + 1):
            loaded = LoadedVersion(self.name, record.version, record.path, self._batching)
            try:
                try:
                    loaded.load()
                except LoadError:
                    raise
                except Exception as unexpected:  # a bug must fail this version, not leave it LOADING
                    raise LoadError(f"unexpected error loading {record.path}: {unexpected!r}") from unexpected
            except LoadError as exc:
                log.error(
                    "Loading servable: {name: %s version: %d} failed (attempt %d of %d): %s",
                    self.name, record.version, attempt, attempts, exc.message,
                )  # fmt: skip
                with self._lock:
                    give_up = attempt == attempts or not record.aspired or self._stopping.is_set()
                    if give_up:
                        record.state = State.END
                        record.error_code = exc.code.value[0]
                        record.error_message = exc.message
                        self._reconcile()
                        return
                if self._stopping.wait(self._retry_interval_s):
                    return
                continue
            with self._lock:
                if self._stopping.is_set():
                    loaded.unload()
                    record.state = State.END
                    self._changed.notify_all()
                    return
                record.loaded = loaded
                record.state = State.AVAILABLE
                log.info("Successfully loaded servable version {name: %s version: %d}", self.name, record.version)
                self._reconcile()
            return

    def _start_unload(self, record: VersionRecord) -> None:
        record.state = State.UNLOADING  # from here on no new request can acquire it
        self._unload_executor.submit(self._finish_unload, record)

    def _finish_unload(self, record: VersionRecord) -> None:
        loaded = record.loaded
        if loaded is not None:
            loaded.wait_idle()
            loaded.unload()
        with self._lock:
            record.loaded = None
            record.state = State.END
            log.info("unloaded %s version %d", self.name, record.version)
            if record.aspired and not self._stopping.is_set():  # asked for again while unloading
                self._records[record.version] = VersionRecord(record.version, record.path)
                self._reconcile()
            self._changed.notify_all()

    # -- requests ----------------------------------------------------------------------------
    def acquire(self, version: int | None = None, label: str | None = None) -> LoadedVersion:
        """The version a request asks for, marked in use; call ``release()`` on it when done."""
        with self._lock:
            if label:
                resolved = self._labels.get(label)
                if resolved is None:
                    raise InvalidArgument(f"Unrecognized servable version label: {label}")
                version = resolved
            if version is not None:
                record = self._records.get(version)
                if record is None or record.state != State.AVAILABLE or record.loaded is None:
                    raise NotFound(f"Servable not found for request: Specific({self.name}, {version})")
                loaded = record.loaded
            else:
                available = [r for r in self._records.values() if r.state == State.AVAILABLE and r.loaded]
                if not available:
                    raise NotFound(f"Servable not found for request: Latest({self.name})")
                newest = max(available, key=lambda r: r.version).loaded
                assert newest is not None  # noqa: S101 - filtered just above
                loaded = newest
            loaded.acquire()
            return loaded

    def statuses(self, version: int | None = None) -> list[VersionRecord]:
        with self._lock:
            if version is not None:
                record = self._records.get(version)
                if record is None:
                    raise NotFound(f"Could not find version {version} of model {self.name}")
                return [_copy(record)]
            if not self._records:
                raise NotFound(f"Could not find any versions of model {self.name}")
            return [_copy(r) for r in sorted(self._records.values(), key=lambda r: -r.version)]

    # -- lifecycle ---------------------------------------------------------------------------
    def wait_settled(self, timeout_s: float) -> bool:
        """Wait until no version is loading (used once at start, like TF Serving's first load)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not any(r.state in (State.START, State.LOADING) for r in self._records.values()),
                timeout=timeout_s,
            )

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            for record in self._records.values():
                if record.state == State.AVAILABLE:
                    self._start_unload(record)


def _copy(record: VersionRecord) -> VersionRecord:
    return VersionRecord(
        record.version, record.path, record.state, record.error_code, record.error_message, None, record.aspired
    )
