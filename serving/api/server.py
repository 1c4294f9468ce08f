"""The grpcio server of ``streamrec.v1.Recommender``, with health, reflection and graceful stop.

Why a synchronous server with a thread pool rather than ``grpc.aio``: the per-request work is two
blocking calls (Feast's Redis read, the model server's Predict) around a little Python; with
asyncio the Feast read either blocks the loop or hops to an executor, and neither beat the thread
pool's p99 under load (see docs/design/serving.md#synchronous-server-not-grpcaio).
``maximum_concurrent_rpcs`` refuses load the pool cannot take (RESOURCE_EXHAUSTED at once)
instead of queueing it past every deadline.

Health (``grpc.health.v1.Health``) answers SERVING for ``""`` and ``streamrec.v1.Recommender``
once every dependency the API holds in memory is ready (generated code, the FeatureService, the
first trending read), so a load balancer only routes to a replica that can answer. Reflection
lists the Recommender (``Recommend`` and ``SimilarItems``), health and reflection services, so
``grpcurl`` needs no .proto file.

Shutdown (:meth:`ApiServer.stop`, called on SIGTERM by ``serve``): health goes NOT_SERVING first
(watchers are told at once), then the server stops accepting calls and gives the in-flight ones
``api.grace_period_s`` to finish; the impression log is flushed last. An open health ``Watch``
stream counts as in flight, so with watchers connected the stop takes the whole grace period.
``serve`` bounds the whole stop at ``grace_period_s + shutdown_timeout_s``: past that the process
writes every thread's stack to stderr and exits 1.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from feast import FeatureStore
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.api.arms import CanaryGate
from serving.api.errors import ApiSetupError
from serving.api.impressions import ImpressionLogger
from serving.api.metrics import ApiMetrics
from serving.api.model_freshness import ModelFreshness
from serving.api.proto import SERVICE_NAME, generated
from serving.api.ranking import Ranker
from serving.api.rerank import Reranker
from serving.api.service import RecommenderService
from serving.api.settings import ApiSettings
from serving.api.similar import SimilarItems
from serving.api.trending import TrendingItems
from serving.api.user_features import UserFeatureReader
from serving.grpc_security import caller_check, listen, server_interceptors, server_tls
from serving.model_client import ModelServerClient
from streamrec.core.attributes import read_schema, user_model_inputs

log = logging.getLogger(__name__)


def recommender_server(
    settings: ApiSettings, service: RecommenderService, health_servicer: health.HealthServicer
) -> tuple[grpc.Server, int]:
    """The Recommender's gRPC server with health and reflection, bound but not started, and its port.

    TLS and caller identity follow the ``grpc`` section (``serving.grpc_security``: with TLS and
    client certificates or a tokens file, every call but health needs a known caller). Requests
    above ``api.max_receive_bytes`` are refused by gRPC (RESOURCE_EXHAUSTED) before any work;
    below it, the API's own checks answer INVALID_ARGUMENT naming the limit (bytes that do not
    parse as the request, too).
    """
    tls = server_tls(settings.grpc)
    check = caller_check(settings.grpc, tls)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.api.max_workers, thread_name_prefix="recommend"),
        interceptors=server_interceptors(check),
        maximum_concurrent_rpcs=settings.api.max_concurrent_rpcs or None,
        options=[("grpc.max_receive_message_length", settings.api.max_receive_bytes), ("grpc.so_reuseport", 0)],
    )
    generated().grpc.add_RecommenderServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.api.host}:{settings.api.port}"
    try:
        return server, listen(server, address, tls)
    except (RuntimeError, OSError) as exc:
        raise ApiSetupError(f"cannot listen on {address} ({exc}); is the port taken? set STREAMREC_API__PORT") from exc


def health_server(settings: ApiSettings, health_servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """A plaintext server with the health service alone on ``api.health_port`` (the same servicer,
    so the same status as the Recommender's port), bound but not started, and its port. For
    Kubernetes' gRPC probes, which cannot speak TLS to a Recommender served over it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.api.host}:{settings.api.health_port}"
    try:
        return server, server.add_insecure_port(address)
    except (RuntimeError, OSError) as exc:
        raise ApiSetupError(
            f"cannot listen on {address} for health ({exc}); is the port taken? set STREAMREC_API__HEALTH_PORT"
        ) from exc


def open_feature_store(settings: ApiSettings) -> FeatureStore:
    """Feast on the configured Redis, with socket timeouts so a hung Redis cannot hang a request.

    Feast's Redis connection string passes extra ``key=value`` pairs to ``redis.Redis`` (to each
    node's client, for a Redis Cluster); the features package builds the string, and the API adds
    its timeouts to it.
    """
    from features.store import open_store, repo_config

    timeout_s = settings.api.feature_timeout_ms / 1000.0
    open_store(settings)  # creates the data dir layout the store expects
    config = repo_config(settings)
    online = dict(config.online_config)
    online["connection_string"] += f",socket_timeout={timeout_s},socket_connect_timeout={timeout_s}"
    config.online_config = online
    store = FeatureStore(repo_path=str(config.repo_path), config=config)
    bound_redis_retries(store)
    return store


def bound_redis_retries(store: FeatureStore) -> None:
    """No backoff sleeps on the request path: retry a dropped connection once, never a timeout.

    redis-py 7's default policy retries a timed-out or failed command three times with
    exponential backoff of up to seconds, so one Redis read past ``feature_timeout_ms`` put the
    request thread to sleep (see docs/design/serving.md#no-retry-backoff-on-the-feature-read).
    The API has its own answer to a failed read (no features, marked degraded), so a timeout is
    final here; only a broken pooled connection (Redis restarted) gets one immediate retry on a
    fresh connection.

    Feast has no setting for the policy, so it is set on the client Feast made (Feast creates one
    client per store and keeps it); other online stores are left alone. A Redis Cluster client
    retries at the cluster level, and its policy only sets how often, timeouts included: never
    here (a pooled connection to a restarted node is already replaced when it is taken from the
    pool, and MOVED redirects are followed outside the retries).
    """
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    from features.feast_internals import online_redis_client

    client = online_redis_client(store)
    if isinstance(client, RedisCluster):
        client.set_retry(Retry(NoBackoff(), 0))
    elif client is not None:
        client.set_retry(Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)))


class ApiServer:
    """Owns every part of one API process; ``start`` then ``stop``."""

    def __init__(
        self,
        settings: ApiSettings,
        *,
        store: FeatureStore | None = None,
        model_client: ModelServerClient | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ApiMetrics()
        self._store = store
        self._client = model_client
        self._server: grpc.Server | None = None
        self._health_server: grpc.Server | None = None
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._trending: TrendingItems | None = None
        self._impressions: ImpressionLogger | None = None
        self._ranking_client: ModelServerClient | None = None
        self.port = 0
        self.health_port = 0

    def start(self) -> int:
        """Build everything, bind, serve; return the bound port (useful when ``api.port`` is 0)."""
        try:
            return self._start()
        except BaseException:
            self.stop(0)  # no half-started threads, producers or channels left behind
            raise

    def _start(self) -> int:
        settings = self.settings
        store = self._store or open_feature_store(settings)
        # what the model's user tower reads: the dataset's attributes, as `features setup` wrote them
        inputs = user_model_inputs(read_schema(settings.data_dir))
        try:
            features = UserFeatureReader(store, inputs=inputs, max_age_s=settings.feature_max_age_s)
            self._trending = TrendingItems(
                store,
                interval_s=settings.api.item_refresh_interval_s,
                max_age_s=settings.feature_max_age_s,
                metrics=self.metrics,
            )
        except ApiSetupError:
            raise
        except Exception as exc:  # Feast raises its own errors for an empty registry
            raise ApiSetupError(
                f"the feature store at {settings.registry_path} is not ready ({exc}); run `streamrec features setup`"
            ) from exc
        self._trending.start()
        client = self._client or ModelServerClient(
            settings.model_server.target,
            settings.model_server.model_name,
            settings.model_budget_s,
            max_message_mb=settings.model_server.grpc_max_message_mb,
            security=settings.grpc,
        )
        self._client = client
        self._impressions = ImpressionLogger(
            settings.kafka,
            settings.topics.impressions,
            self.metrics,
            queue_max=settings.api.impression_queue_max,
            linger_ms=settings.api.impression_linger_ms,
        )
        reranker = None
        if settings.ranking.enabled:
            self._ranking_client = ModelServerClient(
                settings.model_server.target,
                settings.ranking.model_name,
                settings.model_budget_s,
                max_message_mb=settings.model_server.grpc_max_message_mb,
                security=settings.grpc,
            )
            reranker = Reranker(self._ranking_client, self.metrics, candidates=settings.ranking.candidates)
        ranker = Ranker(
            client,
            self._trending,
            self.metrics,
            inputs=inputs,
            budget_s=settings.model_budget_s,
            canary_gate=CanaryGate(settings.api.canary_recheck_s),
            interleave=settings.api.interleave,
            on_answer=ModelFreshness(settings.model_base_path, self.metrics.model_freshness).answered,
            exploration=settings.exploration.rules(),
            reranker=reranker,
        )
        similar = SimilarItems(client, self._trending, self.metrics, budget_s=settings.model_budget_s)
        service = RecommenderService(settings, features, ranker, similar, self._impressions, self.metrics)

        server, self.port = recommender_server(settings, service, self._health)
        server.start()
        self._server = server
        if settings.api.health_port:
            self._health_server, self.health_port = health_server(settings, self._health)
            self._health_server.start()
        if settings.api.metrics_port:
            self.metrics.serve_http(settings.api.metrics_port, settings.api.host)
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "Recommender API on %s:%d (%s; model server %s, %d trending items)",
            settings.api.host,
            self.port,
            "TLS" if settings.grpc.tls else "plaintext",
            settings.model_server.target,
            len(self._trending.snapshot.item_ids),
        )
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, stop accepting, let in-flight calls finish within the grace period, flush."""
        grace = self.settings.api.grace_period_s if grace_s is None else grace_s
        self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._health_server is not None:
            self._health_server.stop(0).wait()
            self._health_server = None
        if self._trending is not None:
            self._trending.stop()
        if self._impressions is not None:
            self._impressions.close()
        if self._client is not None:
            self._client.close()
        if self._ranking_client is not None:
            self._ranking_client.close()
        log.info("Recommender API stopped")

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()
