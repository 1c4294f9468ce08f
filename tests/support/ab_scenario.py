"""Scripted users against the real feedback loop, shared by the e2e test, the A/B fault test and
``bench.loop_decisions``.

Real services: the local model server (in process), the API (in process), Kafka and Redis (the
caller's), the Faust joiner (a child process), and an :class:`~serving.rollout.evaluator.AbEvaluator`
driven from the labeled topic, or (``evaluator_process=True``) the ``streamrec evaluator``
process. Both children can be SIGKILLed and started again. Users are scripted so the outcome is
known: every visit wants one of ``LIKED`` items and clicks it if shown; the scenario keeps what
it was shown and what it clicked. The tiny model ranks a cold user's list by item order
(``tests.support.tiny_model``), so a version's click-through rate is set by where its catalog
order puts the liked items:

* ``BASELINE`` (stable): half of the liked items in its top 10 -> CTR about 0.5;
* ``BROKEN`` ("random weights"): a random catalog order -> few liked items in the top 10;
* ``BETTER`` ("trained on more data"): every liked item in its top 10 -> CTR about 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import grpc
import numpy as np
import pandas as pd
from confluent_kafka import Consumer, Producer

from features import store as feature_store
from features.settings import FeatureStoreTuning
from serving.api.proto import generated
from serving.api.server import ApiServer
from serving.api.settings import ApiSection, ApiSettings
from serving.model_client import ModelServerClient
from serving.model_server.server import ModelServer, ServerOptions
from serving.rollout.decision_log import applied_decisions
from serving.rollout.evaluator import AbEvaluator
from serving.rollout.policy import PolicyConfig
from serving.settings import ModelServerSection
from streamrec.core import contracts
from streamrec.core.events import Click, LabeledExample, decode_event
from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.kafka.consume import consumer_config
from tests.support.processes import settings_env
from tests.support.tiny_model import TINY_SCHEMA, write_tiny_model

ITEMS = [str(i) for i in range(1, 61)]
LIKED = [str(i) for i in range(1, 11)]
OTHERS = [item for item in ITEMS if item not in LIKED]
K = 10
USERS = [f"e2e-user-{n}" for n in range(500)]
Quality = Literal["baseline", "broken", "better"]


def catalog_order(quality: Quality, seed: int = 2) -> list[str]:
    """The tiny model's item order for a version of the given quality (see the module docstring)."""
    if quality == "baseline":
        return LIKED[:5] + OTHERS[:5] + LIKED[5:] + OTHERS[5:]
    if quality == "broken":
        return [str(item) for item in np.random.default_rng(seed).permutation([int(i) for i in ITEMS])]
    return LIKED + OTHERS


class ChildProcess:
    """A project process as a child in its own process group, logging to a file; it can be
    SIGKILLed (no shutdown hook runs) and started again with the same command and environment."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 -- our own command line
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        self._signal(signal.SIGKILL, wait_s=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        try:
            self._signal(signal.SIGTERM, wait_s=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, number: int, wait_s: float) -> None:
        if self.process is not None and self.alive():
            os.killpg(self.process.pid, number)
            self.process.wait(wait_s)
        if self._log is not None:
            self._log.close()
            self._log = None


def child_env(settings: CommonSettings, **extra: str) -> dict[str, str]:
    """``settings_env`` without the Prometheus multiprocess variables a parent that imported Feast carries."""
    env = settings_env(settings, **extra)
    for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR", "prometheus_multiproc_dir"):
        env.pop(name, None)
    return env


def policy_env(policy: PolicyConfig) -> dict[str, str]:
    return {
        f"STREAMREC_EVALUATOR__POLICY__{name.upper()}": str(getattr(policy, name)) for name in PolicyConfig.model_fields
    }


@dataclass
class Scenario:
    """The running loop; ``visit`` and ``run_until`` drive it."""

    settings: CommonSettings
    workdir: Path
    base_path: Path
    admin: ModelServerClient
    evaluator: AbEvaluator | None  # None: the evaluator is ``evaluator_process``
    stub: Any
    pb2: Any
    producer: Producer
    labeled: Consumer | None
    joiner: ChildProcess
    evaluator_process: ChildProcess | None = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    failures: list[str] = field(default_factory=list)
    served_versions: set[tuple[str, int]] = field(default_factory=set)
    # Responses by (arm, model version): the impressions each version has had.
    impressions: dict[tuple[str, int], int] = field(default_factory=dict)
    # Every response: request id -> (arm, version, items shown); and every (request, item) clicked.
    shown: dict[str, tuple[str, int, tuple[str, ...]]] = field(default_factory=dict)
    clicked: set[tuple[str, str]] = field(default_factory=set)
    visits: int = 0

    def write_version(self, version: int, quality: Quality, seed: int = 2) -> None:
        write_tiny_model(self.base_path, version, item_ids=catalog_order(quality, seed))

    def visit(self) -> None:
        user = USERS[self.visits % len(USERS)]
        self.visits += 1
        try:
            response = self.stub.Recommend(self.pb2.RecommendRequest(user_id=user, k=K), timeout=2.0)
        except grpc.RpcError as error:
            self.failures.append(f"{error.code()}: {error.details()}")
            return
        served = (response.arm, int(response.model_version))
        self.served_versions.add(served)
        self.impressions[served] = self.impressions.get(served, 0) + 1
        wanted = str(self.rng.choice(LIKED))
        shown = [item.item_id for item in response.items]
        self.shown[response.request_id] = (*served, tuple(shown))
        if wanted in shown:
            self.clicked.add((response.request_id, wanted))
            click = Click(
                event_id=f"c-{response.request_id}",
                event_time=datetime.now(UTC),
                user_id=user,
                request_id=response.request_id,
                item_id=wanted,
                position=shown.index(wanted),
                kind="click",
            )
            self.producer.produce(self.settings.topics.clicks, key=click.key(), value=click.to_bytes())
        self.producer.poll(0)

    def run_until(
        self, done: Callable[[], bool], timeout_s: float, *, visits_per_round: int = 40, rate: float | None = None
    ) -> None:
        """Visit, feed the evaluator the labeled examples and let it decide, until ``done()``.

        ``rate`` caps the visits per second (None: as fast as the API answers).
        """
        started = time.monotonic()
        deadline = started + timeout_s
        first_visit = self.visits
        while time.monotonic() < deadline:
            for _ in range(visits_per_round):
                self.visit()
            if rate is not None:
                time.sleep(max(0.0, started + (self.visits - first_visit) / rate - time.monotonic()))
            self.producer.flush(5)
            if self.evaluator is not None and self.labeled is not None:
                self.evaluator.refresh_labels()
                for message in self.labeled.consume(num_messages=5000, timeout=0.3):
                    self.evaluator.handle(decode_event(message.value(), LabeledExample))
                self.evaluator.decide()
            if done():
                return
        figures = self.evaluator.figures() if self.evaluator is not None else "in the evaluator process"
        raise TimeoutError(f"not done within {timeout_s}s; figures {figures}")

    def decisions(self) -> list[str]:
        """The actions of the applied decisions, oldest first."""
        return [record["action"] for record in applied_decisions(self.evaluator_dir / "decisions.jsonl")]

    @property
    def evaluator_dir(self) -> Path:
        return self.workdir / "evaluator"


def set_up_features(settings: ApiSettings) -> None:
    """Profiles of the scripted users and the catalog, with the tiny model's schema (so the API
    sends exactly the inputs every version accepts); the attributes change no tiny-model score."""
    users = pd.DataFrame(
        {
            "user_id": USERS,
            "segment": [f"segment-{n % 3}" for n in range(len(USERS))],
            "tenure_days": [float(n % 400) for n in range(len(USERS))],
        }
    )
    items = pd.DataFrame({"item_id": ITEMS, "tags": [[f"tag-{int(item) % 4}"] for item in ITEMS]})
    store = feature_store.open_store(settings)
    feature_store.setup_dataset(store, "ab", TINY_SCHEMA, users, items)


@contextmanager
def ab_scenario(
    settings: CommonSettings,
    workdir: Path,
    *,
    policy: PolicyConfig,
    # A scripted user clicks as soon as the answer arrives; on a loaded 2-core machine that can be
    # over a second after the API stamped the impression, and a click outside the window is a miss.
    label_window_s: float = 3.0,
    evaluator_process: bool = False,
    joiner_session_timeout_s: float = 30.0,
) -> Iterator[Scenario]:
    """Model server with version 1 (``baseline``) as stable, API, joiner and evaluator on ``settings``.

    ``evaluator_process``: the evaluator is ``streamrec evaluator`` (``scenario.evaluator_process``,
    not started: start it once the labels are as the test wants them) instead of in process.
    """
    base_path = workdir / "models" / contracts.MODEL_NAME
    write_tiny_model(base_path, 1, item_ids=catalog_order("baseline"))
    with ExitStack() as cleanup:
        model_server = ModelServer(
            ServerOptions(
                host="127.0.0.1",
                port=0,
                model_name=contracts.MODEL_NAME,
                model_base_path=base_path,
                file_system_poll_wait_seconds=0.5,
            )
        ).start()
        cleanup.callback(model_server.stop, 0)
        admin = ModelServerClient(
            f"127.0.0.1:{model_server.port}", server_base_path=str(base_path), config_file=workdir / "models.config"
        )
        cleanup.callback(admin.close)
        admin.publish_stable(1)
        api_settings = ApiSettings(
            kafka=settings.kafka,
            redis=settings.redis,
            topics=settings.topics,
            paths=PathSettings(state_dir=workdir),
            model_server=ModelServerSection(host="127.0.0.1", port=model_server.port, request_timeout_ms=500),
            api=ApiSection(port=0, metrics_port=0, canary_share=0.5, canary_recheck_s=0.5, experiment_salt="e2e"),
            features=FeatureStoreTuning(project=f"e2e{uuid.uuid4().hex[:8]}"),
        )
        set_up_features(api_settings)
        api = ApiServer(api_settings)
        api_port = api.start()
        cleanup.callback(api.stop, 1)
        stubs = generated()
        channel = grpc.insecure_channel(f"127.0.0.1:{api_port}")
        cleanup.callback(channel.close)
        labeled = None
        if not evaluator_process:
            labeled = Consumer(consumer_config(settings, f"eval-{uuid.uuid4().hex}", from_beginning=True))
            labeled.subscribe([settings.topics.labeled])
            cleanup.callback(labeled.close)
        joiner_env = child_env(
            settings,
            STREAMREC_JOINER__APP_ID=f"joiner-{uuid.uuid4().hex[:8]}",
            STREAMREC_JOINER__LABEL_WINDOW_S=str(label_window_s),
            STREAMREC_JOINER__GRACE_S="0.5",
            STREAMREC_JOINER__EXPIRE_INTERVAL_S="0.2",
            STREAMREC_JOINER__SESSION_TIMEOUT_S=str(joiner_session_timeout_s),
            STREAMREC_JOINER__STATE_DIR=str(workdir / "joiner"),
        )
        faust = [sys.executable, "-m", "faust", "-A", "streams.joiner_app", "worker", "-l", "info", "--without-web"]
        joiner = ChildProcess(faust, joiner_env, workdir / "joiner.log")
        joiner.start()
        cleanup.callback(joiner.stop)
        process = None
        if evaluator_process:
            evaluator_env = child_env(
                settings,
                STREAMREC_MODEL_SERVER__PORT=str(model_server.port),
                STREAMREC_MODEL_SERVER__MODEL_BASE_PATH=str(base_path),
                STREAMREC_MODEL_SERVER__MODEL_CONFIG_FILE=str(workdir / "models.config"),
                STREAMREC_EVALUATOR__OUTPUT_DIR=str(workdir / "evaluator"),
                STREAMREC_EVALUATOR__LABELS_REFRESH_S="0.5",
                STREAMREC_EVALUATOR__SNAPSHOT_INTERVAL_S="0.5",
                **policy_env(policy),
            )
            streamrec = str(Path(sys.executable).with_name("streamrec"))
            process = ChildProcess([streamrec, "evaluator"], evaluator_env, workdir / "evaluator.log")
            cleanup.callback(process.stop)
        scenario = Scenario(
            settings=settings,
            workdir=workdir,
            base_path=base_path,
            admin=admin,
            evaluator=None if evaluator_process else AbEvaluator(admin, policy, workdir / "evaluator"),
            stub=stubs.grpc.RecommenderStub(channel),
            pb2=stubs.pb2,
            producer=Producer(settings.kafka.client_config()),
            labeled=labeled,
            joiner=joiner,
            evaluator_process=process,
        )
        yield scenario
