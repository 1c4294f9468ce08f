"""Settings of the recommendation API (``streamrec api serve`` / ``python -m serving``).

``ApiSettings`` is the model server's settings (``model_server``: where to predict, and the
budget of one Predict) plus the feature store's (``features``: where Feast is, and the age past
which stream features count as missing) plus this ``api`` section. Two budgets deliberately live
in those shared sections and are not repeated here, so one knob means one thing everywhere:

* the model budget (deadline of the model server call, after which the API answers from
  trending items) is ``model_server.request_timeout_ms``;
* the feature max age is ``features.max_feature_age_s``.

The impression topic is ``topics.impressions``. Imports nothing heavy.
"""

from __future__ import annotations

from pydantic import ConfigDict, Field, model_validator

from features.settings import FeaturesSettings
from serving.settings import ProcessTuning, ServingSettings
from streamrec.core import contracts
from streamrec.core.settings import CommonSettings


class ApiSection(ProcessTuning):
    """The API's own knobs; every one is a ``STREAMREC_API__<NAME>`` variable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Loopback by default; containers set 0.0.0.0 (STREAMREC_API__HOST).
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    # A second, plaintext port that serves grpc.health.v1 only (0: none): Kubernetes' gRPC probes
    # speak no TLS, and health answers anyone anyway (serving.grpc_security.identity).
    health_port: int = Field(default=0, ge=0, le=65535)
    # The model exports its top TOP_K_EXPORTED, so no request can ask for more.
    max_k: int = Field(default=50, ge=1, le=contracts.TOP_K_EXPORTED)
    default_k: int = Field(default=10, ge=1, le=contracts.TOP_K_EXPORTED)
    # A serialized request above this is refused with INVALID_ARGUMENT (a request is a user id, a
    # small context map and at most a few thousand item ids; anything bigger is a bug or abuse).
    max_request_bytes: int = Field(default=64 * 1024, ge=64)
    # gRPC's own receive limit: a message above it is refused (RESOURCE_EXHAUSTED) before it is
    # even parsed. Kept above max_request_bytes so a merely oversized request gets the API's
    # INVALID_ARGUMENT naming the limit, while a flood of megabytes costs no parsing.
    max_receive_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # ``context``: at most this many entries, each key and value at most max_context_chars.
    max_context_entries: int = Field(default=32, ge=0)
    max_context_chars: int = Field(default=256, ge=1)
    max_user_id_chars: int = Field(default=256, ge=1)
    max_item_id_chars: int = Field(default=256, ge=1)
    # Item ids a request may exclude (``exclude_item_ids``) and rank (``candidate_item_ids``): the
    # model takes them as one [1, N] tensor, so these bound one call's work.
    max_exclude_items: int = Field(default=1000, ge=0)
    max_candidate_items: int = Field(default=1000, ge=0)
    # Arms: sha256(salt:user_id) mapped to [0, 1); below canary_share -> canary. A new salt
    # reshuffles users (a new experiment); the same salt keeps every user in their arm.
    experiment_salt: str = Field(default="streamrec-ab-v1", min_length=1)
    canary_share: float = Field(default=0.1, ge=0.0, le=1.0)
    # When the model server has no canary label yet, canary users are served by stable (and
    # logged as stable); the label is looked for again after this long.
    canary_recheck_s: float = Field(default=5.0, gt=0)
    # Canary users see the team-draft interleaving of the canary's and stable's lists (two model
    # calls), which the evaluator compares per request (``serving/api/interleave.py`` says why);
    # False: they see the canary's own list and the evaluator can only compare the arms' CTRs.
    interleave: bool = True
    # Trending items (item_stats of the whole catalog) are re-read in the background this often.
    item_refresh_interval_s: float = Field(default=30.0, gt=0)
    # Socket timeout of the feature store's Redis reads: a hung Redis costs a request this
    # much (then it is answered without features, marked degraded), never a hang.
    feature_timeout_ms: int = Field(default=50, ge=1)
    # Server threads. Each request spends most of its time waiting on Redis and the model server,
    # but every thread also takes the GIL back after each wait, so more threads than needed only
    # add contention. See docs/design/serving.md#server-threads.
    max_workers: int = Field(default=8, ge=1)
    # Requests waiting for a thread beyond this are refused with RESOURCE_EXHAUSTED at once
    # rather than queued past any sensible deadline. 0: no limit.
    max_concurrent_rpcs: int = Field(default=256, ge=0)
    # Deadline applied to calls that arrive without one (grpcurl, some clients).
    default_deadline_ms: int = Field(default=1000, ge=1)
    # On SIGTERM: health goes NOT_SERVING, then in-flight calls get this long to finish.
    grace_period_s: float = Field(default=5.0, ge=0)
    # After the grace period the rest of the stop (impression flush, background threads) gets
    # this long; a process still alive then writes every thread's stack to stderr and exits 1.
    shutdown_timeout_s: float = Field(default=20.0, gt=0)
    # Prometheus /metrics; 0 turns the HTTP endpoint off (the registry still counts).
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # Impressions waiting for the background producer; beyond this they are dropped and counted.
    impression_queue_max: int = Field(default=10_000, ge=1)
    impression_linger_ms: int = Field(default=50, ge=0)

    @model_validator(mode="after")
    def _default_k_within_max(self) -> ApiSection:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        if self.max_receive_bytes < self.max_request_bytes:
            raise ValueError(
                f"max_receive_bytes ({self.max_receive_bytes}) must be at least max_request_bytes "
                f"({self.max_request_bytes}), so an oversized request gets the API's own answer"
            )
        return self


class ApiSettings(ServingSettings, FeaturesSettings):
    api: ApiSection = ApiSection()

    @property
    def model_budget_s(self) -> float:
        return self.model_server.request_timeout_ms / 1000.0

    @property
    def feature_max_age_s(self) -> float:
        return self.features.max_feature_age_s


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (ApiSettings,)
