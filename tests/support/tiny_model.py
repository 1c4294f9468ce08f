"""A tiny, deterministic SavedModel with exactly the signatures of ``streamrec.core.contracts``.

The user inputs follow an attribute schema (``streamrec.core.attributes.user_model_inputs``):
:data:`TINY_SCHEMA` by default (a categorical and a numeric user attribute, a multi-categorical item
attribute, so serving tests exercise every input kind), or the ``schema`` a test passes. The
attributes change no score: the model accepts them, as the contract requires, and ignores them.

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
* ``similar``: ``item_id`` [B] and ``exclude_items`` [B, E] -> ``item_ids`` and ``scores``
  [B, TOP_K_EXPORTED]: ``e_i . e_j + bias`` for every other item ``j``, best first
  (:func:`expected_similar`); the item itself and excluded ids never appear; the tail and the whole
  answer for an unknown item are id ``""`` with score :data:`PAD_SCORE` (the contract's padding).

``nan=True`` makes every output score NaN (for testing how consumers treat a bad model);
``broken=True`` writes a version directory that is not a loadable SavedModel. Warm-up requests
are written to ``assets.extra/tf_serving_warmup_requests`` as TF Serving's ``PredictionLog``
TFRecords, so a server can (and TF Serving does) replay them before serving the version; the
schema goes to ``assets.extra/attribute_schema.json``, as the trainer's export writes it.

Every version is written into a hidden temp directory beside the target and renamed into
``<base_path>/<version>`` in one step, so a poller never sees a half-written model. Exports are
cached per (items, bias, nan, schema) within a process and copied, since one export takes seconds.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from streamrec.core import contracts
from streamrec.core.attributes import SCHEMA_FILE, Attribute, AttributeSchema, InputKind, user_model_inputs

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
PAD_SCORE = float(np.finfo(np.float32).min)  # the contract's padding score of ``similar``
TINY_SCHEMA = AttributeSchema(
    user=(
        Attribute(name="segment", type="categorical"),
        Attribute(name="tenure_days", type="numeric", boundaries=(7.0, 30.0, 365.0)),
    ),
    item=(Attribute(name="tags", type="multi_categorical", max_tokens=4),),
)


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
    item_ids: list[str], recent_items: list[str], *, exclude: Sequence[str] = (), bias: float = 0.0, k: int = 10
) -> list[str]:
    """The first ``k`` non-padding ids ``recommend`` returns (ties broken by catalog order)."""
    scores = expected_scores(item_ids, recent_items, bias=bias)
    ranked = sorted((item for item in item_ids if item not in set(exclude)), key=lambda item: -scores[item])
    return ranked[:k]


def expected_similar(
    item_ids: list[str], item: str, *, exclude: Sequence[str] = (), bias: float = 0.0, k: int = 10
) -> list[tuple[str, float]]:
    """The first ``k`` non-padding (id, score) pairs ``similar`` returns for ``item`` (catalog order
    breaks ties); an item the model does not know gets none."""
    if item not in item_ids:
        return []
    embeddings = item_embeddings(len(item_ids))
    scores = embeddings @ embeddings[item_ids.index(item)] + np.float32(bias)
    kept = [j for j, other in enumerate(item_ids) if other != item and other not in set(exclude)]
    ranked = sorted(kept, key=lambda j: -scores[j])
    return [(item_ids[j], float(scores[j])) for j in ranked[:k]]


_UNKNOWN: dict[InputKind, object] = {"string": "", "float": np.float32(np.nan), "int": np.int64(0)}


def example_inputs(
    user_ids: list[str],
    *,
    recent_items: list[list[str]] | None = None,
    exclude_items: list[list[str]] | None = None,
    schema: AttributeSchema = TINY_SCHEMA,
) -> dict[str, np.ndarray]:
    """A ``recommend`` request for ``user_ids`` with unknown attributes and zero counts (pads lists with "")."""
    batch = len(user_ids)
    recent = recent_items or [[] for _ in user_ids]
    exclude = exclude_items or [[] for _ in user_ids]
    width = max(1, *(len(row) for row in exclude))
    inputs: dict[str, np.ndarray] = {}
    for name, kind in user_model_inputs(schema).items():
        if kind == "strings":  # recent_items, or a multi-categorical attribute (one "" column: unknown)
            inputs[name] = np.full((batch, 1), "", dtype=object)
        else:
            dtype = {"string": object, "float": np.float32, "int": np.int64}[kind]
            inputs[name] = np.full(batch, _UNKNOWN[kind], dtype=dtype)
    inputs["user_id"] = np.array(user_ids, dtype=object)
    inputs["recent_items"] = np.array(
        [(row + [""] * contracts.RECENT_ITEMS_MAX)[: contracts.RECENT_ITEMS_MAX] for row in recent], dtype=object
    )
    inputs["exclude_items"] = np.array([row + [""] * (width - len(row)) for row in exclude], dtype=object)
    return inputs


def _user_specs(schema: AttributeSchema) -> dict[str, object]:
    import tensorflow as tf

    kinds = {"string": ([None], tf.string), "strings": ([None, None], tf.string), "int": ([None], tf.int64)}
    kinds["float"] = ([None], tf.float32)
    specs = {
        name: tf.TensorSpec(kinds[kind][0], kinds[kind][1], name=name)
        for name, kind in user_model_inputs(schema).items()
    }
    specs["recent_items"] = tf.TensorSpec([None, contracts.RECENT_ITEMS_MAX], tf.string, name="recent_items")
    return specs


def _build_module(item_ids: list[str], bias: float, nan: bool, schema: AttributeSchema):  # noqa: ANN202 - a tf.Module
    import tensorflow as tf

    count = len(item_ids)
    top_k = min(contracts.TOP_K_EXPORTED, count)
    pad = contracts.TOP_K_EXPORTED - top_k
    user_specs = _user_specs(schema)

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

        @tf.function(
            input_signature=[
                {
                    "item_id": tf.TensorSpec([None], tf.string, name="item_id"),
                    "exclude_items": list_spec("exclude_items"),
                }
            ]
        )
        def similar(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            index = self.table.lookup(inputs["item_id"])  # [B], -1 when unknown
            known = index >= 0
            query = tf.gather(self.embeddings, tf.maximum(index, 0))  # [B, 2]
            scores = tf.matmul(query, self.embeddings, transpose_b=True) + self.bias
            itself = tf.one_hot(index, depth=count, on_value=True, off_value=False)
            excluded = tf.reduce_max(tf.one_hot(self.table.lookup(inputs["exclude_items"]), depth=count), axis=1) > 0
            masked = tf.where(itself | excluded, tf.constant(-math.inf, tf.float32), scores)
            best_scores, best_index = tf.math.top_k(masked, k=top_k, sorted=True)
            valid = tf.math.is_finite(best_scores) & known[:, None]
            best_ids = tf.where(valid, tf.gather(self.catalog, best_index), "")
            best_scores = tf.where(valid, best_scores, PAD_SCORE)
            best_ids = tf.pad(best_ids, [[0, 0], [0, pad]], constant_values="")
            best_scores = tf.pad(best_scores, [[0, 0], [0, pad]], constant_values=PAD_SCORE)
            return {"item_ids": best_ids, "scores": self._poisoned(best_scores)}

    return TinyRecommender()


def _write_warmup(export_dir: Path, item_ids: list[str], schema: AttributeSchema) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    inputs = example_inputs(["warmup-user"], recent_items=[item_ids[:2]], exclude_items=[item_ids[:1]], schema=schema)
    score_inputs = {key: value for key, value in inputs.items() if key != "exclude_items"}
    score_inputs["item_ids"] = np.array([item_ids[:3]], dtype=object)
    similar_inputs = {"item_id": np.array(item_ids[:1], dtype=object), "exclude_items": np.array([[""]], dtype=object)}
    requests = (
        (contracts.RECOMMEND_SIGNATURE, inputs),
        (contracts.SCORE_SIGNATURE, score_inputs),
        (contracts.SIMILAR_SIGNATURE, similar_inputs),
    )
    path = export_dir / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / SCHEMA_FILE).write_text(schema.to_json())
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, tensors in requests:
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
    schema: AttributeSchema = TINY_SCHEMA,
) -> Path:
    """Write version ``version`` of the tiny model under ``base_path`` atomically; return its dir.

    ``schema``: the attribute schema whose ``user_model_inputs`` the signatures take.
    """
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
        # A SavedModel does not contain its version number, so one export per (items, bias, nan,
        # schema) is copied for every version: tests write many versions, and an export takes seconds.
        shutil.copytree(_template(tuple(item_ids), float(bias), nan, schema), staging)
    os.rename(staging, target)
    return target


_TEMPLATES: dict[tuple[tuple[str, ...], float, bool, str], Path] = {}
_TEMPLATE_LOCK = threading.Lock()


def _template(item_ids: tuple[str, ...], bias: float, nan: bool, schema: AttributeSchema) -> Path:
    with _TEMPLATE_LOCK:
        key = (item_ids, bias, nan, schema.to_json())
        if key not in _TEMPLATES:
            import tensorflow as tf

            root = Path(tempfile.mkdtemp(prefix="tiny-model-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            export_dir = root / "model"
            module = _build_module(list(item_ids), bias, nan, schema)
            tf.saved_model.save(
                module,
                str(export_dir),
                signatures={
                    contracts.RECOMMEND_SIGNATURE: module.recommend,
                    contracts.SCORE_SIGNATURE: module.score,
                    contracts.SIMILAR_SIGNATURE: module.similar,
                    "serving_default": module.recommend,
                },
            )
            _write_warmup(export_dir, list(item_ids), schema)
            _TEMPLATES[key] = export_dir
        return _TEMPLATES[key]
