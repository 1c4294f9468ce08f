"""A tiny, deterministic SavedModel with exactly the signatures of ``streamrec.core.contracts``.

Serving tests need a model whose answers they can compute by hand, that loads in well under a
second, and whose versions differ observably. This one has no trained weights: every item of
``item_ids`` (index ``i`` of ``n``) gets a fixed 2-d embedding ``e_i = (cos i, sin i)`` and a base
score ``b_i = 1 - i / n`` (earlier items are "more popular"); a user is the mean embedding ``u``
of the ``recent_items`` the model knows (zero when none), so

    score(user, item i) = b_i + u . e_i + bias

and :func:`expected_scores` computes the same thing in numpy. ``bias`` shifts every score, so two
versions written with different biases give observably different answers.

Signatures (see ``streamrec.core.contracts``):

* ``recommend`` (also ``serving_default``): the user inputs plus ``exclude_items`` [B, E] ->
  ``item_ids`` string [B, TOP_K_EXPORTED] and ``scores`` float32 [B, TOP_K_EXPORTED], best first.
  Exclusion happens inside the graph. **Padding rule:** when fewer than ``TOP_K_EXPORTED`` items
  are eligible (a small catalog, or many excluded), the tail is padded with item id ``""`` and
  score ``-inf``; consumers drop ``""`` entries.
* ``score``: the user inputs plus ``item_ids`` [B, N] -> ``scores`` float32 [B, N]; an id the
  model does not know (or the ``""`` pad) scores ``-inf``.

``nan=True`` makes every output score NaN (for testing how consumers treat a bad model);
``broken=True`` writes a version directory that is not a loadable SavedModel. Warm-up requests
are written to ``assets.extra/tf_serving_warmup_requests`` as TF Serving's ``PredictionLog``
TFRecords, so a server can (and TF Serving does) replay them before serving the version.

Every version is written into a hidden temp directory beside the target and renamed into
``<base_path>/<version>`` in one step, so a poller never sees a half-written model. Exports are
cached per (items, bias, nan) within a process and copied, since one export takes seconds.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

from streamrec.core import contracts

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"


def item_embeddings(count: int) -> np.ndarray:
    """``e_i = (cos i, sin i)`` for ``i`` in ``range(count)``, float32 [count, 2]."""
    index = np.arange(count, dtype=np.float64)
    return np.stack([np.cos(index), np.sin(index)], axis=1).astype(np.float32)


def base_scores(count: int) -> np.ndarray:
    return (1.0 - np.arange(count, dtype=np.float64) / max(count, 1)).astype(np.float32)


def expected_scores(item_ids: list[str], recent_items: list[str], *, bias: float = 0.0) -> dict[str, float]:
    """The score the tiny model gives every catalog item for a user with ``recent_items``."""
    index = {item: i for i, item in enumerate(item_ids)}
    embeddings = item_embeddings(len(item_ids))
    known = [index[item] for item in recent_items if item in index]
    user = embeddings[known].mean(axis=0) if known else np.zeros(2, dtype=np.float32)
    scores = base_scores(len(item_ids)) + embeddings @ user + np.float32(bias)
    return {item: float(scores[i]) for item, i in index.items()}


def expected_top(
    item_ids: list[str], recent_items: list[str], *, exclude: list[str] = (), bias: float = 0.0, k: int = 10
) -> list[str]:
    """The first ``k`` non-padding ids ``recommend`` returns (ties broken by catalog order)."""
    scores = expected_scores(item_ids, recent_items, bias=bias)
    ranked = sorted((item for item in item_ids if item not in set(exclude)), key=lambda item: -scores[item])
    return ranked[:k]


def example_inputs(
    user_ids: list[str], *, recent_items: list[list[str]] | None = None, exclude_items: list[list[str]] | None = None
) -> dict[str, np.ndarray]:
    """A ``recommend`` request for ``user_ids`` with empty profiles (pads lists with "")."""
    batch = len(user_ids)
    recent = recent_items or [[] for _ in user_ids]
    exclude = exclude_items or [[] for _ in user_ids]
    width = max(1, *(len(row) for row in exclude))
    inputs: dict[str, np.ndarray] = {
        "user_id": np.array(user_ids, dtype=object),
        **{name: np.array([""] * batch, dtype=object) for name in contracts.USER_STRING_INPUTS[1:]},
        "recent_items": np.array(
            [(row + [""] * contracts.RECENT_ITEMS_MAX)[: contracts.RECENT_ITEMS_MAX] for row in recent], dtype=object
        ),
        "count_1h": np.zeros(batch, dtype=np.int64),
        "count_24h": np.zeros(batch, dtype=np.int64),
        "exclude_items": np.array([row + [""] * (width - len(row)) for row in exclude], dtype=object),
    }
    return inputs


def _build_module(item_ids: list[str], bias: float, nan: bool):  # noqa: ANN202 - returns a tf.Module subclass
    import tensorflow as tf

    count = len(item_ids)
    top_k = min(contracts.TOP_K_EXPORTED, count)
    pad = contracts.TOP_K_EXPORTED - top_k

    user_specs = {name: tf.TensorSpec([None], tf.string, name=name) for name in contracts.USER_STRING_INPUTS}
    user_specs["recent_items"] = tf.TensorSpec([None, contracts.RECENT_ITEMS_MAX], tf.string, name="recent_items")
    for name in contracts.USER_COUNT_INPUTS:
        user_specs[name] = tf.TensorSpec([None], tf.int64, name=name)

    def list_spec(name: str) -> tf.TensorSpec:
        return tf.TensorSpec([None, None], tf.string, name=name)

    class TinyRecommender(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tiny_recommender")
            self.catalog = tf.constant(item_ids, dtype=tf.string)
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(item_ids, dtype=tf.string), tf.range(count, dtype=tf.int64)
                ),
                default_value=-1,
            )
            self.embeddings = tf.constant(item_embeddings(count))
            self.base = tf.constant(base_scores(count))
            self.bias = tf.constant(bias, dtype=tf.float32)
            self.poison = tf.constant(math.nan if nan else 0.0, dtype=tf.float32)

        def _user_vectors(self, recent_items: tf.Tensor) -> tf.Tensor:
            index = self.table.lookup(recent_items)  # [B, R], -1 where unknown or ""
            known = tf.cast(index >= 0, tf.float32)
            vectors = tf.gather(self.embeddings, tf.maximum(index, 0)) * known[..., None]
            return tf.reduce_sum(vectors, axis=1) / tf.maximum(tf.reduce_sum(known, axis=1, keepdims=True), 1.0)

        def _all_scores(self, recent_items: tf.Tensor) -> tf.Tensor:
            users = self._user_vectors(recent_items)  # [B, 2]
            return self.base[None, :] + tf.matmul(users, self.embeddings, transpose_b=True) + self.bias

        def _poisoned(self, scores: tf.Tensor) -> tf.Tensor:
            return scores + self.poison if nan else scores

        @tf.function(input_signature=[{**user_specs, "exclude_items": list_spec("exclude_items")}])
        def recommend(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            scores = self._all_scores(inputs["recent_items"])
            excluded_index = self.table.lookup(inputs["exclude_items"])  # [B, E]
            excluded = tf.reduce_max(tf.one_hot(excluded_index, depth=count, dtype=tf.float32), axis=1) > 0
            masked = tf.where(excluded, tf.constant(-math.inf, tf.float32), scores)
            best_scores, best_index = tf.math.top_k(masked, k=top_k, sorted=True)
            best_ids = tf.where(tf.math.is_inf(best_scores), "", tf.gather(self.catalog, best_index))
            best_ids = tf.pad(best_ids, [[0, 0], [0, pad]], constant_values="")
            best_scores = tf.pad(best_scores, [[0, 0], [0, pad]], constant_values=-math.inf)
            return {"item_ids": best_ids, "scores": self._poisoned(best_scores)}

        @tf.function(input_signature=[{**user_specs, "item_ids": list_spec("item_ids")}])
        def score(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            scores = self._all_scores(inputs["recent_items"])
            index = self.table.lookup(inputs["item_ids"])  # [B, N]
            picked = tf.gather(scores, tf.maximum(index, 0), batch_dims=1)
            picked = tf.where(index >= 0, picked, tf.constant(-math.inf, tf.float32))
            return {"scores": self._poisoned(picked)}

    return TinyRecommender()


def _write_warmup(export_dir: Path, item_ids: list[str]) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    inputs = example_inputs(["warmup-user"], recent_items=[item_ids[:2]], exclude_items=[item_ids[:1]])
    score_inputs = {key: value for key, value in inputs.items() if key != "exclude_items"}
    score_inputs["item_ids"] = np.array([item_ids[:3]], dtype=object)
    path = export_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, tensors in ((contracts.RECOMMEND_SIGNATURE, inputs), (contracts.SCORE_SIGNATURE, score_inputs)):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=contracts.MODEL_NAME, signature_name=signature)
            )
            for name, value in tensors.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def write_tiny_model(
    base_path: Path,
    version: int,
    *,
    item_ids: list[str],
    bias: float = 0.0,
    broken: bool = False,
    nan: bool = False,
) -> Path:
    """Write version ``version`` of the tiny model under ``base_path`` atomically; return its dir."""
    if not item_ids:
        raise ValueError("item_ids must name at least one item")
    if len(set(item_ids)) != len(item_ids) or "" in item_ids:
        raise ValueError("item_ids must be distinct and non-empty strings")
    base_path = Path(base_path)
    base_path.mkdir(parents=True, exist_ok=True)
    target = base_path / str(int(version))
    if target.exists():
        raise FileExistsError(f"{target} exists; model versions are immutable, write a new version number")
    staging = base_path / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    if broken:
        staging.mkdir()
        (staging / "saved_model.pb").write_bytes(b"this is not a SavedModel protobuf\n")
        (staging / "variables").mkdir()
    else:
        # A SavedModel does not contain its version number, so one export per (items, bias, nan)
        # is copied for every version: tests write many versions, and an export takes seconds.
        shutil.copytree(_template(tuple(item_ids), float(bias), nan), staging)
    os.rename(staging, target)
    return target


_TEMPLATES: dict[tuple[tuple[str, ...], float, bool], Path] = {}
_TEMPLATE_LOCK = threading.Lock()


def _template(item_ids: tuple[str, ...], bias: float, nan: bool) -> Path:
    with _TEMPLATE_LOCK:
        key = (item_ids, bias, nan)
        if key not in _TEMPLATES:
            import tensorflow as tf

            root = Path(tempfile.mkdtemp(prefix="tiny-model-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            export_dir = root / "model"
            module = _build_module(list(item_ids), bias, nan)
            tf.saved_model.save(
                module,
                str(export_dir),
                signatures={
                    contracts.RECOMMEND_SIGNATURE: module.recommend,
                    contracts.SCORE_SIGNATURE: module.score,
                    "serving_default": module.recommend,
                },
            )
            _write_warmup(export_dir, list(item_ids))
            _TEMPLATES[key] = export_dir
        return _TEMPLATES[key]
