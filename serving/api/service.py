"""The ``Recommend`` and ``SimilarItems`` handlers.

Recommend: validate, read features, choose the arm, rank (the catalog, or the request's
allow-list), log the impression, answer. SimilarItems: validate, ask the stable model for the
item's neighbours (``serving.api.similar``), answer; it logs no impression (there is no user).

Deadlines: the client's deadline (``context.time_remaining()``, or ``api.default_deadline_ms``
for calls without one) bounds everything. The model call gets what is left of it (see
``ranking``), the feature read is a sub-millisecond Redis round trip with a socket timeout, and
a call whose deadline has already passed is answered DEADLINE_EXCEEDED without further work.

Errors the caller sees: INVALID_ARGUMENT (bad input, with the reason), DEADLINE_EXCEEDED,
UNAVAILABLE (shutting down, or nothing can answer), INTERNAL (a bug; logged with a traceback).
Each is counted in ``streamrec_api_errors_total{code}`` (``streamrec_api_similar_errors_total``
for SimilarItems).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from serving.api.arms import assign_arm
from serving.api.errors import InvalidRequest
from serving.api.impressions import ImpressionLogger, PendingImpression
from serving.api.metrics import ApiMetrics
from serving.api.proto import generated
from serving.api.ranking import NoAnswer, Ranked, Ranker
from serving.api.settings import ApiSection, ApiSettings
from serving.api.similar import SimilarAnswer, SimilarItems
from serving.api.user_features import UserFeatureReader, UserFeatures
from serving.api.validation import ValidRequest, ValidSimilarRequest, validate, validate_similar

log = logging.getLogger(__name__)

_pb = generated()
_Valid = TypeVar("_Valid", ValidRequest, ValidSimilarRequest)


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_RecommenderServicer: Any = _pb.grpc.RecommenderServicer  # generated at import, so untyped


class RecommenderService(_RecommenderServicer):  # type: ignore[misc]  # subclassing the generated base
    def __init__(
        self,
        settings: ApiSettings,
        features: UserFeatureReader,
        ranker: Ranker,
        similar: SimilarItems,
        impressions: ImpressionLogger,
        metrics: ApiMetrics,
    ) -> None:
        self._settings = settings
        self._features = features
        self._ranker = ranker
        self._similar = similar
        self._impressions = impressions
        self._metrics = metrics
        self._default_deadline_s = settings.api.default_deadline_ms / 1000.0

    def Recommend(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's method name
        started = time.perf_counter()
        arm_label = "none"
        try:
            deadline = self._deadline(context)
            valid = self._validated(validate, request)
            arm = assign_arm(self._settings.api.experiment_salt, valid.user_id, self._settings.api.canary_share)
            arm_label = arm
            ranked, features = self._answer(valid, arm, deadline)
            arm_label = ranked.arm
            request_id = uuid.uuid4().hex
            latency_ms = (time.perf_counter() - started) * 1000.0
            self._log_impression(request_id, valid, ranked, features, latency_ms)
            return self._response(request_id, ranked)
        except _Refused as refused:
            code, message = refused.code, str(refused)
        except Exception:
            log.exception("Recommend failed for a request of %d bytes", request.ByteSize())
            code, message = grpc.StatusCode.INTERNAL, "internal error in the recommendation API; see its log"
        finally:
            self._metrics.latency.labels(arm_label).observe(time.perf_counter() - started)
        self._metrics.errors.labels(code.name).inc()
        context.abort(code, message)

    def SimilarItems(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's method name
        started = time.perf_counter()
        try:
            deadline = self._deadline(context)
            valid: ValidSimilarRequest = self._validated(validate_similar, request)
            try:
                answer = self._similar.similar(
                    valid.item_id, k=valid.k, exclude=valid.exclude_item_ids, deadline=deadline
                )
            except NoAnswer as exc:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
            if answer.fallback_reason:
                self._metrics.similar_fallbacks.labels(answer.fallback_reason).inc()
            return self._similar_response(answer)
        except _Refused as refused:
            code, message = refused.code, str(refused)
        except Exception:
            log.exception("SimilarItems failed for a request of %d bytes", request.ByteSize())
            code, message = grpc.StatusCode.INTERNAL, "internal error in the recommendation API; see its log"
        finally:
            self._metrics.similar_latency.observe(time.perf_counter() - started)
        self._metrics.similar_errors.labels(code.name).inc()
        context.abort(code, message)

    def _deadline(self, context: grpc.ServicerContext) -> float:
        """The client's deadline as a ``time.monotonic()`` instant (the default one for calls without)."""
        remaining = context.time_remaining()
        return time.monotonic() + (remaining if remaining is not None else self._default_deadline_s)

    def _validated(self, check: Callable[[Any, ApiSection], _Valid], request: Any) -> _Valid:
        try:
            return check(request, self._settings.api)
        except InvalidRequest as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

    def _answer(self, valid: ValidRequest, arm: str, deadline: float) -> tuple[Ranked, UserFeatures]:
        features_failed = False
        try:
            features = self._features.read(valid.user_id)
        except Exception as exc:  # Redis down or slow: answer without features, marked degraded
            log.warning("feature read for user %r failed: %s", valid.user_id, exc)
            self._metrics.degraded.labels("feature_store").inc()
            features, features_failed = self._features.unknown(valid.user_id), True
        if time.monotonic() >= deadline:
            raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while reading features")
        seen = list(features.recent_items) if valid.exclude_seen else []
        exclude = list(dict.fromkeys([*seen, *valid.exclude_item_ids]))
        try:
            ranked = self._ranker.rank(
                features,
                k=valid.k,
                exclude=exclude,
                arm=arm,  # type: ignore[arg-type]  # assign_arm returns an Arm
                deadline=deadline,
                features_failed=features_failed,
                candidates=valid.candidate_item_ids,
            )
        except NoAnswer as exc:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        if ranked.fallback_reason:
            self._metrics.fallbacks.labels(ranked.fallback_reason).inc()
        return ranked, features

    def _log_impression(
        self, request_id: str, valid: ValidRequest, ranked: Ranked, features: UserFeatures, latency_ms: float
    ) -> None:
        if not ranked.items:
            return
        raw = features.raw()
        if valid.context:
            raw["context"] = dict(valid.context)
        self._impressions.log(
            PendingImpression(
                request_id=request_id,
                user_id=valid.user_id,
                arm=ranked.arm,
                model_version=ranked.model_version,
                items=tuple(ranked.items),
                fallback=ranked.fallback,
                degraded=ranked.degraded,
                serve_latency_ms=round(latency_ms, 3),
                features=raw,
                event_time=time.time(),
                teams=ranked.teams,
                shared=ranked.shared,
                control_version=ranked.control_version,
                propensities=ranked.propensities,
                explored=ranked.explored,
                retrieval_scores=ranked.retrieval_scores,
                ranker_version=ranked.ranker_version,
            )
        )

    def _response(self, request_id: str, ranked: Ranked) -> Any:
        return _pb.pb2.RecommendResponse(
            items=[
                _pb.pb2.RecommendedItem(item_id=item_id, score=score, position=position)
                for position, (item_id, score) in enumerate(ranked.items)
            ],
            request_id=request_id,
            model_version=ranked.model_version,
            arm=ranked.arm,
            fallback=ranked.fallback,
            fallback_reason=ranked.fallback_reason,
            degraded=ranked.degraded,
        )

    def _similar_response(self, answer: SimilarAnswer) -> Any:
        return _pb.pb2.SimilarItemsResponse(
            items=[_pb.pb2.SimilarItem(item_id=item_id, score=score) for item_id, score in answer.items],
            model_version=answer.model_version,
            fallback=answer.fallback,
            fallback_reason=answer.fallback_reason,
        )
