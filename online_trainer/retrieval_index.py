"""Approximate top-k over a large catalog: an inverted-file (IVF) index built at export, searched in the graph.

Brute force reads every item vector per request (a 100,000 x 64 catalog is 25.6 MB per call), and
on a CPU that memory traffic is the cost of ``recommend``. An IVF index (FAISS' ``IndexIVFFlat``
layout, searched with plain TF ops so the official TF Serving image serves it):

* **Built** once per export (:func:`build_ivf_index`): spherical k-means (``faiss.Kmeans``, seeded)
  groups the item-tower vectors into ``round(ivf_lists_per_sqrt_n * sqrt(N))`` lists; each item is
  in exactly one list, the one whose centroid is nearest.
* **Capped**: lists are stored padded to one width ``M`` ([L, M] catalog rows, -1 pad), so a list
  larger than ``ivf_max_list_factor`` x the mean list size is *split* (slabs along its principal
  axis, each with its own centroid) rather than spilled into a neighbour's list: a spilled item is
  reachable only through a centroid that is not its nearest, a split item through one nearer still.
  The padded matrix holds at most ``ivf_max_list_factor`` x N x (lists after splitting / lists
  k-means made) slots; k-means rarely leaves more than a few percent of lists to split.
* **Searched** (:class:`IvfSearch`): score the centroids, take the best ``n_probe`` lists, score
  only their members (stored contiguously, list by list, [L, M, d]), drop excluded rows there, top-k.
  With ``n_probe`` equal to the number of lists the answer is the brute-force one.

Figures (cost, recall) and the choice of defaults: docs/design/trainer.md#retrieval-over-large-catalogs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import tensorflow as tf

from online_trainer.inference import PAD_SCORE, padded_answer
from online_trainer.model_config import ModelConfig


@dataclass(frozen=True)
class IvfIndex:
    """Centroids [L, d] (unit rows) and each list's catalog rows [L, M] (int64, -1 pad)."""

    centroids: np.ndarray
    members: np.ndarray

    @property
    def n_lists(self) -> int:
        return int(self.members.shape[0])

    @property
    def list_size(self) -> int:
        return int(self.members.shape[1])

    def positions(self, n_items: int) -> np.ndarray:
        """[N] int64: each catalog row's slot in the flattened lists (``list * M + slot``)."""
        slots = np.flatnonzero(self.members.reshape(-1) >= 0)
        positions = np.full(n_items, -1, dtype=np.int64)
        positions[self.members.reshape(-1)[slots]] = slots
        if (positions < 0).any():
            raise ValueError("IvfIndex: some catalog rows are in no list; build the index from the same vectors")
        return positions

    def list_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """[L, M, d] float32: the members' vectors list by list, zeros in padding slots."""
        padded = np.zeros((*self.members.shape, vectors.shape[1]), dtype=np.float32)
        used = self.members >= 0
        padded[used] = vectors[self.members[used]]
        return padded


def n_lists_for(n_items: int, lists_per_sqrt_n: float) -> int:
    """The FAISS rule of thumb: about ``lists_per_sqrt_n * sqrt(N)`` lists, at least 1, at most N."""
    return max(1, min(n_items, round(lists_per_sqrt_n * math.sqrt(n_items))))


def build_ivf_index(
    vectors: np.ndarray, *, n_lists: int, max_list_factor: float, iterations: int, seed: int
) -> IvfIndex:
    """Cluster unit ``vectors`` [N, d] into lists no larger than ``max_list_factor`` x N / ``n_lists``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n_items, dim = vectors.shape
    if n_lists < 1 or n_lists > n_items:
        raise ValueError(f"build_ivf_index: n_lists must be in [1, {n_items}] (the number of items), got {n_lists}")
    if max_list_factor < 1.0:
        raise ValueError(
            f"build_ivf_index: max_list_factor must be >= 1 (a multiple of the mean list size), got {max_list_factor}"
        )
    kmeans = faiss.Kmeans(
        dim, n_lists, niter=iterations, seed=seed, spherical=True, min_points_per_centroid=1, verbose=False
    )
    kmeans.train(vectors)
    _, nearest = kmeans.index.search(vectors, 1)
    assignment = nearest[:, 0]
    found = np.asarray(kmeans.centroids, dtype=np.float32)
    cap = max(1, math.ceil(max_list_factor * n_items / n_lists))
    order = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[order], np.arange(n_lists + 1))
    centroids: list[np.ndarray] = []
    lists: list[np.ndarray] = []
    for cluster in range(n_lists):
        rows = order[bounds[cluster] : bounds[cluster + 1]]
        if len(rows) == 0:
            continue  # an empty list would only waste a probe
        if len(rows) <= cap:
            centroids.append(found[cluster])
            lists.append(rows)
        else:
            for piece in _split(vectors, rows, cap):
                centroids.append(_unit(vectors[piece].mean(axis=0)))
                lists.append(piece)
    width = max(len(rows) for rows in lists)
    members = np.full((len(lists), width), -1, dtype=np.int64)
    for number, rows in enumerate(lists):
        members[number, : len(rows)] = rows
    return IvfIndex(np.stack(centroids).astype(np.float32), members)


def index_for_config(vectors: np.ndarray, config: ModelConfig) -> IvfIndex:
    """The IVF index of ``vectors`` with ``config``'s list count, list cap, k-means iterations and seed."""
    return build_ivf_index(
        vectors,
        n_lists=n_lists_for(len(vectors), config.ivf_lists_per_sqrt_n),
        max_list_factor=config.ivf_max_list_factor,
        iterations=config.ivf_kmeans_iterations,
        seed=config.seed,
    )


def _split(vectors: np.ndarray, rows: np.ndarray, cap: int) -> list[np.ndarray]:
    """``rows`` in ``ceil(len / cap)`` equal slabs along their principal axis (each at most ``cap``)."""
    points = vectors[rows] - vectors[rows].mean(axis=0)
    _, _, axes = np.linalg.svd(points, full_matrices=False)
    along = rows[np.argsort(points @ axes[0], kind="stable")]
    return list(np.array_split(along, math.ceil(len(rows) / cap)))


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class IvfSearch(tf.Module):  # type: ignore[misc]  # tensorflow ships no type hints
    """The index as variables (saved with the SavedModel) and the top-k search over it, in TF ops."""

    def __init__(self, index: IvfIndex, vectors: np.ndarray, *, n_probe: int, min_candidates: int = 0) -> None:
        """``n_probe`` is raised until any ``n_probe`` lists hold ``min_candidates`` items (or all lists),
        so an answer is never short of k items for lack of candidates, only when exclusions empty them."""
        super().__init__(name="ivf")
        if n_probe < 1:
            raise ValueError(f"IvfSearch: n_probe must be >= 1 (lists scored per query), got {n_probe}")
        smallest_first = np.cumsum(np.sort((index.members >= 0).sum(axis=1)))
        enough = int(np.searchsorted(smallest_first, min_candidates)) + 1
        self.n_probe = min(max(n_probe, enough), index.n_lists)
        self.list_size = index.list_size
        self.centroids = tf.Variable(index.centroids, trainable=False, name="ivf_centroids")
        self.members = tf.Variable(index.members, trainable=False, name="ivf_members")
        self.list_vectors = tf.Variable(index.list_vectors(vectors), trainable=False, name="ivf_list_vectors")
        self.positions = tf.Variable(index.positions(len(vectors)), trainable=False, name="ivf_positions")

    def item_vectors(self, rows: tf.Tensor) -> tf.Tensor:
        """The vectors of catalog ``rows`` [B] (int64 >= 0), read from the lists.

        Gathered, never read whole: one sparse read (a gather) puts a TF variable in copy-on-read
        mode, after which every whole read copies it (40 MB per call for 100,000 items).
        """
        position = tf.gather(self.positions, rows)
        return tf.gather_nd(self.list_vectors, tf.stack([position // self.list_size, position % self.list_size], -1))

    def rank(
        self, queries: tf.Tensor, item_ids: tf.Tensor, exclude_rows: tf.Tensor, *, k: int, temperature: float
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Top-k of the probed lists' members per query [B, d]; the contract of ``inference.rank``."""
        batch = tf.shape(queries)[0]
        _, probed = tf.math.top_k(tf.matmul(queries, self.centroids, transpose_b=True), k=self.n_probe)
        probed = tf.cast(probed, tf.int64)  # [B, P]
        vectors = tf.gather(self.list_vectors, probed)  # [B, P, M, d]
        scores = tf.einsum("bd,bpmd->bpm", queries, vectors) / temperature
        rows = tf.gather(self.members, probed)  # [B, P, M]
        scores = tf.where(rows >= 0, scores, float("-inf"))
        width = self.n_probe * self.list_size
        scores = tf.reshape(scores, [batch, width])
        rows = tf.reshape(rows, [batch, width])
        scores = self._drop(scores, probed, exclude_rows)
        depth = min(k, width)
        top_scores, top_columns = tf.math.top_k(scores, k=depth)
        top_rows = tf.gather(rows, top_columns, batch_dims=1)
        top_ids = tf.gather(item_ids, tf.maximum(top_rows, 0))
        return padded_answer(top_ids, top_scores, k)

    def _drop(self, scores: tf.Tensor, probed: tf.Tensor, exclude_rows: tf.Tensor) -> tf.Tensor:
        """``scores`` [B, P*M] with excluded rows at -inf: an excluded row's column is found from its
        list and slot (O(B*E*P)), never by scattering over the whole catalog."""
        position = tf.gather(self.positions, tf.maximum(exclude_rows, 0))  # [B, E]
        in_list, slot = position // self.list_size, position % self.list_size
        hits = tf.equal(in_list[:, :, tf.newaxis], probed[:, tf.newaxis, :])  # [B, E, P]
        hits = tf.logical_and(hits, (exclude_rows >= 0)[:, :, tf.newaxis])
        where = tf.where(hits)  # [K, 3]: batch row, exclusion, probe
        column = where[:, 2] * self.list_size + tf.gather_nd(slot, where[:, :2])
        pairs = tf.stack([where[:, 0], column], axis=1)
        return tf.tensor_scatter_nd_update(scores, pairs, tf.fill(tf.shape(pairs)[:1], float("-inf")))

    def similar_rank(
        self, item_ids: tf.Tensor, query_rows: tf.Tensor, exclude_rows: tf.Tensor, *, k: int, temperature: float
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Top-k items nearest each query row [B] (-1: not in the catalog); ``inference.similar_rank``'s contract."""
        known = query_rows >= 0
        queries = self.item_vectors(tf.maximum(query_rows, 0))
        excluded = tf.concat([query_rows[:, tf.newaxis], exclude_rows], axis=1)
        ids, scores = self.rank(queries, item_ids, excluded, k=k, temperature=temperature)
        return tf.where(known[:, tf.newaxis], ids, ""), tf.where(known[:, tf.newaxis], scores, PAD_SCORE)
