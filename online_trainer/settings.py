"""Settings of the trainer processes (``streamrec train`` and ``streamrec trainer``).

``TrainerSettings`` extends ``FeaturesSettings`` (the trainer reads features through Feast) with
a ``trainer`` section; every value can be set with ``STREAMREC_TRAINER__<NAME>``. This module
imports nothing heavy (no TensorFlow, no Feast), so the environment check stays cheap.

Paths and addresses agree with serving because they are the same settings: ``TrainerSettings``
also extends ``ServingSettings``, so the ``model_server`` section (address, model name, base
path ``paths.state_dir / "models" / contracts.MODEL_NAME`` unless set, ``models.config`` file,
load timeout) is the one the model server and the API read. Versions are first written beside
the base path, into a hidden staging directory on the same file system
(:attr:`TrainerSettings.staging_path`), and only renamed into the base path once the validation
gate has passed: a rejected or half-written version is never visible there.
See docs/design/trainer.md#trainer-settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.settings import FeaturesSettings
from serving.settings import ServingSettings
from streamrec.core import contracts
from streamrec.core.events import InteractionKind
from streamrec.core.settings import CommonSettings

if TYPE_CHECKING:
    from online_trainer.ope_gate import OpeRule


def _known_kinds(kinds: Iterable[str]) -> None:
    unknown = sorted(set(kinds) - set(get_args(InteractionKind)))
    if unknown:
        raise ValueError(f"unknown event kind(s) {unknown}; streamrec's kinds are {list(get_args(InteractionKind))}")


def worker_address(text: str) -> str:
    """``host:port`` of a training worker (port 1-65535), stripped; ValueError naming the form otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"worker address {text!r} is not host:port (e.g. trainer-1.internal:2222)")
    return f"{host}:{int(port)}"


class OpeGateTuning(BaseModel):
    """The off-policy gate (``online_trainer/ope_gate.py``): before a candidate reaches the canary
    label, its click rate is estimated on the lists stable showed in the last ``lookback_s``
    (at most ``max_examples`` labeled examples kept), and a candidate significantly below stable
    (by more than ``margin``) is rejected. With fewer than ``min_lists`` logged lists or a support
    below ``min_support`` it abstains and the canary decides, as without the gate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    estimator: Literal["ips", "snips", "dr"] = "dr"
    min_lists: int = Field(default=100, ge=1)
    min_support: float = Field(default=0.3, ge=0.0, le=1.0)
    margin: float = Field(default=0.0, ge=0.0, le=1.0)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    lookback_s: float = Field(default=3_600.0, gt=0)
    max_examples: int = Field(default=50_000, ge=1)

    def rule(self) -> OpeRule:
        """The gate's rule (``online_trainer.ope_gate.judge`` takes it)."""
        from online_trainer.ope_gate import OpeRule

        return OpeRule(self.estimator, self.min_lists, self.min_support, self.margin, self.confidence)


class RankerTuning(BaseModel):
    """How the trainer fine-tunes the ranking model (``online_trainer/ranker_line.py``) when
    ``ranking.enabled``: at least ``min_examples`` new labeled examples per interval (at most
    ``max_pending`` waiting), the newest ``holdout_fraction`` held out for its gate, which rejects a
    candidate whose held-out log loss is worse than the serving model's by more than
    ``gate_margin``, significantly, or whose order within held-out requests is worse by more
    than ``auc_margin``; ``retention`` versions kept."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_examples: int = Field(default=200, ge=2)
    max_pending: int = Field(default=200_000, ge=2)
    holdout_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=256, ge=1)
    gate_margin: float = Field(default=0.0, ge=0.0)
    # The order within held-out requests (clicked vs not clicked pairs of one list) may be worse
    # than the serving model's by at most auc_margin, judged once there are min_request_pairs pairs.
    auc_margin: float = Field(default=0.0, ge=0.0, le=1.0)
    min_request_pairs: int = Field(default=50, ge=1)
    retention: int = Field(default=5, ge=2)


# How a served SavedModel stores its hashed embedding tables (online_trainer.quantize).
TableDtype = Literal["float32", "float16", "int8"]

# The hyperparameters of ``streamrec tune``: each is a ModelConfig field the bootstrap trains with,
# searched among choices or over a (low, high) log range (SearchSpace's fields, in this order).
CHOICES = ("embedding_dim", "batch_size")
RANGES = ("learning_rate", "temperature")
SEARCHED = CHOICES + RANGES
# Names people reach for that are not bootstrap hyperparameters, and where each one lives instead.
NOT_SEARCHED = {
    "replay_fraction": "trainer.replay_fraction mixes replayed rows into the online fine-tunes only; the "
    "bootstrap never replays, so a bootstrap search cannot judge it (bench/prequential.py measures the loop)",
    "epochs": "every trial trains --epochs (trainer.search.epochs); `streamrec train` keeps its own epochs",
}


class SearchSpace(BaseModel):
    """Where ``streamrec tune`` looks: ``embedding_dim`` and ``batch_size`` are choices,
    ``learning_rate`` and ``temperature`` are (low, high) ranges sampled on a log scale (low ==
    high fixes the value). Each names the :class:`~online_trainer.model_config.ModelConfig` field it sets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedding_dim: tuple[int, ...] = (32, 64, 128)
    batch_size: tuple[int, ...] = (256, 512, 1_024, 2_048)
    learning_rate: tuple[float, float] = (0.001, 0.02)
    temperature: tuple[float, float] = (0.02, 0.2)

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, values: object) -> object:
        if isinstance(values, dict):
            for name in values:
                if name in NOT_SEARCHED:
                    raise ValueError(f"{name!r} cannot be searched: {NOT_SEARCHED[name]}")
                if name not in SEARCHED:
                    raise ValueError(f"unknown hyperparameter {name!r}; the search space has {list(SEARCHED)}")
        return values

    @field_validator(*CHOICES)
    @classmethod
    def _positive_choices(cls, choices: tuple[int, ...]) -> tuple[int, ...]:
        if not choices or min(choices) < 1:
            raise ValueError(f"give one or more choices, each >= 1 (got {list(choices)})")
        return tuple(sorted(set(choices)))

    @field_validator(*RANGES)
    @classmethod
    def _log_range(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        low, high = bounds
        if not 0 < low <= high < float("inf"):
            raise ValueError(f"give LOW:HIGH with 0 < LOW <= HIGH (a log-scale range), got {low}:{high}")
        return bounds


class HyperparameterSearch(BaseModel):
    """``streamrec tune``: a seeded random search (keras-tuner) of ``max_trials`` trials, each a
    bootstrap of ``epochs`` epochs judged on the gate's hold-out (``online_trainer/tuning.py``).
    ``sample_users``: search on that many users' interactions (seeded), so a search can run small.
    The best trial's values go to ``best_config_path`` (default ``<state_dir>/tuning/best_config.json``),
    every trial beside it (``trials.json``); ``streamrec train`` starts from that file when
    ``use_best_config`` and it exists, and its own flags still win."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_trials: int = Field(default=8, ge=1, le=1_000)
    epochs: int = Field(default=1, ge=1)
    sample_users: int | None = Field(default=None, ge=1)
    seed: int = Field(default=1, ge=1)  # keras-tuner takes 0 for "draw a seed": every run would differ
    space: SearchSpace = SearchSpace()
    best_config_path: Path | None = None
    use_best_config: bool = True


class TrainerTuning(BaseModel):
    """How the trainer learns, validates and publishes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- source -----------------------------------------------------------------------------
    group_id: str = Field(default="streamrec-trainer", min_length=1)
    # ``interactions`` today; ``labeled`` (clicked examples from the joiner) once it exists.
    source: Literal["interactions", "labeled"] = "interactions"
    # Where a group without committed offsets starts. ``earliest`` loses nothing: events the
    # bootstrap model was already trained on (event time <= its ``--until``) are skipped.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # Kafka's consumer session timeout: a trainer that died without leaving its group keeps its
    # partitions this long, so a restarted trainer's first poll waits up to this. Kafka's default;
    # the broker's ``group.min.session.timeout.ms`` (6 s by default) is the floor.
    session_timeout_s: float = Field(default=45.0, ge=1.0, le=3600.0)

    # -- what is learned ----------------------------------------------------------------------
    # Event kinds that become training examples (None: every kind). Every event still moves the
    # user's recent items and counts; e.g. ["add_to_cart", "purchase"] learns from intent only.
    positive_kinds: tuple[str, ...] | None = None
    # Loss weight of an example by its kind (1.0 for a kind not named), e.g. {"purchase": 4.0}: a
    # purchase counts four times a view. Weights multiply each example's loss term.
    kind_weights: dict[str, float] = Field(default_factory=dict)

    # -- the online loop ----------------------------------------------------------------------
    # Seconds between candidates. An interaction waits for the interval to end, then for the
    # fine-tune and publish, and the newest fifth of each interval (held out for the gate) waits one
    # interval more, as does all of an interval whose candidate the gate rejects: a shorter interval
    # gives fresher versions, with no measurable loss in hit rate at 40 s.
    interval_s: float = Field(default=40.0, gt=0)
    max_examples: int = Field(default=20_000, ge=1, description="fine-tune early once this many new examples wait")
    min_examples: int = Field(default=1, ge=1, description="an interval with fewer new examples is skipped")
    finetune_epochs: int = Field(default=1, ge=1)
    # The fine-tune's softmax: over every catalog item (exact; B x catalog logits per step, about
    # as fast as in-batch for catalogs of thousands of items) or over the batch's own items (logQ
    # corrected, for catalogs too large to score per step). An interval's batches hold only the few
    # items its users just rated, so in-batch negatives teach the model to tell those apart, not to
    # rank the whole catalog the way serving does.
    finetune_loss: Literal["full_catalog", "in_batch"] = "full_catalog"
    # Replay: each fine-tune mixes the new examples with a sample of older ones, so the model
    # does not forget; ``replay_fraction`` is the share of replayed examples in that mix. Little
    # replay weighs the interval's own events more: the bootstrap already learned the history, what
    # an interval adds is today's.
    replay_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    replay_buffer_size: int = Field(default=200_000, ge=0)
    # -- the validation gate ------------------------------------------------------------------
    holdout_size: int = Field(default=2_000, ge=1, description="most recent examples held out per interval")
    gate_k: int = Field(default=10, ge=1, le=contracts.TOP_K_EXPORTED)
    gate_margin: float = Field(
        default=0.02, ge=0.0, le=1.0, description="candidate hit@k may be worse than the serving model by this much"
    )
    # A drop beyond the margin rejects only if the hold-out shows it (one-sided sign test,
    # p < gate_alpha; online_trainer/gate.py says why). 1.0: every drop beyond the margin rejects.
    gate_alpha: float = Field(default=0.05, gt=0.0, le=1.0)
    # The gate reports hit@k per segment (the ``slices`` section: bounds, min_examples, flag_loss)
    # and flags a candidate that wins overall but loses a segment badly; true: such a candidate is
    # rejected (reason ``slice``) instead of published with the flag in its lineage.
    block_on_slice_flag: bool = False
    ope_gate: OpeGateTuning = OpeGateTuning()
    ranker: RankerTuning = RankerTuning()
    search: HyperparameterSearch = HyperparameterSearch()
    # -- bootstrap ----------------------------------------------------------------------------
    bootstrap_epochs: int | None = Field(default=None, ge=1, description="None: the model's default")
    min_feature_coverage: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="below this share of examples with stream features offline, bootstrap falls back to the log",
    )
    # -- distributed bootstrap (online_trainer/distributed.py) ---------------------------------
    # Local worker processes of ``streamrec train`` under MultiWorkerMirroredStrategy; 1 trains in
    # this process without tf.distribute. Each worker steps through 1/N of every global batch.
    workers: int = Field(default=1, ge=1, le=64)
    # Several machines: every worker's host:port, comma-separated (the chief first, the same list on
    # each machine), and this machine's index in it; empty: ``workers`` local processes (or TF_CONFIG).
    worker_hosts: str = ""
    task_index: int = Field(default=0, ge=0)
    # -- versions -----------------------------------------------------------------------------
    retention: int = Field(default=5, ge=1, description="versions kept on disk (serving labels are never removed)")
    # How the served SavedModel stores its hashed embedding tables: float16 halves them, int8
    # (a scale per row) quarters them; the resume files stay float32 (online_trainer.quantize).
    serving_table_dtype: TableDtype = "float32"
    state_path: Path | None = None
    # Publish each version as canary through the model server (``model_server`` section); when
    # off, or when the server is unreachable, versions are still written and the server's file
    # system poll sees them.
    publish: bool = True
    # Tests only (tests/faults/test_trainer_crash.py): the online trainer stops itself with SIGSTOP
    # at this step of its first publish (``publish.stop_at``), so a test can SIGKILL it exactly in
    # the window it names. Never set it for a real trainer: the process would stay stopped.
    fault_stop_at: Literal["staged", "checkpointed", "revealed"] | None = None
    # -- observability ------------------------------------------------------------------------
    tensorboard_dir: Path | None = None
    metrics_port: int = Field(default=9104, ge=0, le=65535, description="0: no /metrics endpoint")
    # Produce times of consumed example records no published version covers yet (held out, or in a
    # rejected interval), kept for the next version's ``lineage["freshness"]``; beyond this many,
    # the oldest are dropped (their freshness is never observed); 0: none are kept.
    freshness_pending_max: int = Field(default=200_000, ge=0)

    @field_validator("positive_kinds")
    @classmethod
    def _some_positive_kind(cls, kinds: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if kinds is not None and not kinds:
            raise ValueError("positive_kinds is empty, so nothing would be learned; unset it to learn every kind")
        _known_kinds(kinds or ())
        return kinds

    @field_validator("kind_weights")
    @classmethod
    def _finite_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        _known_kinds(weights)
        bad = {kind: weight for kind, weight in weights.items() if not 0.0 <= weight < float("inf")}
        if bad:
            raise ValueError(f"kind_weights must be finite and >= 0, got {bad}")
        return weights

    @field_validator("worker_hosts")
    @classmethod
    def _host_ports(cls, text: str) -> str:
        hosts = [worker_address(host) for host in text.split(",") if host.strip()]
        if len(hosts) == 1:
            raise ValueError("worker_hosts names one worker; give every worker's host:port, or leave it empty")
        return ",".join(hosts)

    @property
    def worker_host_list(self) -> tuple[str, ...]:
        """``worker_hosts`` as a tuple (empty when unset)."""
        return tuple(self.worker_hosts.split(",")) if self.worker_hosts else ()

    @model_validator(mode="after")
    def _task_in_cluster(self) -> TrainerTuning:
        hosts = self.worker_host_list
        if hosts and self.task_index >= len(hosts):
            raise ValueError(
                f"task_index {self.task_index} is not one of the {len(hosts)} worker_hosts (0..{len(hosts) - 1})"
            )
        if hosts and self.workers not in (1, len(hosts)):
            raise ValueError(
                f"workers = {self.workers} but worker_hosts names {len(hosts)}; "
                "with worker_hosts each machine runs one worker: leave workers at 1"
            )
        return self

    @property
    def labeled_reader_group_id(self) -> str:
        """The client group of the reader of labeled examples (off-policy gate, ranking model); it
        assigns partitions and commits nothing, but the client needs a group and an ACL for it."""
        return f"{self.group_id}-ope"

    def learns(self, kind: str) -> bool:
        """Whether an event of ``kind`` becomes a training example."""
        return self.positive_kinds is None or kind in self.positive_kinds


class TrainerSettings(FeaturesSettings, ServingSettings):
    trainer: TrainerTuning = TrainerTuning()

    @property
    def source_topic(self) -> str:
        return self.topics.interactions if self.trainer.source == "interactions" else self.topics.labeled

    @property
    def staging_path(self) -> Path:
        """Hidden sibling of the base path (same file system, so the final rename is atomic)."""
        base = self.model_base_path
        return base.parent / f".{base.name}.staging"

    @property
    def trainer_state_path(self) -> Path:
        """Per-version trainer checkpoints (user state, replay buffer) for a restart."""
        return self.trainer.state_path or self.paths.state_dir / "trainer"

    @property
    def tensorboard_dir(self) -> Path:
        return self.trainer.tensorboard_dir or self.paths.state_dir / "tensorboard"

    @property
    def best_config_path(self) -> Path:
        """Where ``streamrec tune`` writes the best trial's values and ``streamrec train`` reads them."""
        return self.trainer.search.best_config_path or self.paths.state_dir / "tuning" / "best_config.json"


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (TrainerSettings,)
