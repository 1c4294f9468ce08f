"""The IVF index of large catalogs: brute force when every list is probed, exclusions, padding,
split lists, a save/load round trip through the export, and its recall on a clustered catalog."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from online_trainer import export
from online_trainer.catalog import ItemCatalog
from online_trainer.examples import examples_from_interactions, user_arrays
from online_trainer.inference import PAD_SCORE, catalog_vectors, rank, recommend, similar, similar_rank
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.retrieval_index import IvfIndex, IvfSearch, build_ivf_index, index_for_config, n_lists_for
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema

K = contracts.TOP_K_EXPORTED
TEMPERATURE = 0.05


def _unit(rows: np.ndarray) -> np.ndarray:
    unit: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return unit


def _clustered(n_items: int, dim: int, clusters: int, seed: int, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres: what trained item vectors look like."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(clusters, dim)))
    noise = rng.normal(scale=spread / np.sqrt(dim), size=(n_items, dim))
    return _unit(centres[rng.integers(0, clusters, n_items)] + noise)


def _ids(n_items: int) -> tf.Tensor:
    return tf.constant(np.array([f"item-{row}".encode() for row in range(n_items)], dtype=object))


def _index(vectors: np.ndarray, *, factor: float = 1.5, lists: int | None = None) -> IvfIndex:
    n_lists = lists if lists is not None else n_lists_for(len(vectors), 4.0)
    return build_ivf_index(vectors, n_lists=n_lists, max_list_factor=factor, iterations=10, seed=0)


def test_every_item_is_in_one_list_and_large_lists_are_split() -> None:
    # one dense clump of 600 items among 1,400 spread ones: k-means gives it a list far above the cap
    rng = np.random.default_rng(3)
    clump = _unit(np.array([1.0] + [0.0] * 15) + rng.normal(scale=0.01, size=(600, 16)))
    vectors = np.concatenate([clump, _unit(rng.normal(size=(1_400, 16)))])
    index = _index(vectors, factor=1.5, lists=40)
    cap = int(np.ceil(1.5 * len(vectors) / 40))
    rows = index.members[index.members >= 0]
    assert sorted(rows.tolist()) == list(range(len(vectors)))  # each catalog row exactly once
    assert index.list_size <= cap and index.n_lists > 40  # the clump was split, not truncated
    assert index.members.size <= cap * index.n_lists  # slots: at most the cap per list
    positions = index.positions(len(vectors))
    assert (index.members.reshape(-1)[positions] == np.arange(len(vectors))).all()
    np.testing.assert_allclose(np.linalg.norm(index.centroids, axis=1), 1.0, rtol=1e-5)
    flat = index.list_vectors(vectors).reshape(-1, 16)
    np.testing.assert_array_equal(flat[positions], vectors)


def test_probing_every_list_is_brute_force() -> None:
    vectors = _clustered(3_000, 16, 40, seed=1)
    search = IvfSearch(_index(vectors), vectors, n_probe=10**6)
    users = tf.constant(_clustered(6, 16, 40, seed=2))
    exclude = tf.constant([[0, 1, -1], [5, -1, -1], [-1, -1, -1], [7, 8, 9], [2, 2, 2], [-1, 4, -1]], tf.int64)
    ids, scores = search.rank(users, _ids(3_000), exclude, k=K, temperature=TEMPERATURE)
    exact_ids, exact_scores = rank(users, tf.constant(vectors), _ids(3_000), exclude, k=K, temperature=TEMPERATURE)
    assert (ids.numpy() == exact_ids.numpy()).all()
    np.testing.assert_allclose(scores.numpy(), exact_scores.numpy(), rtol=1e-5, atol=1e-5)
    queries = tf.constant([3, 2_999, -1], tf.int64)
    similar_exclude = tf.constant([[4, -1], [-1, -1], [1, -1]], tf.int64)
    got = search.similar_rank(_ids(3_000), queries, similar_exclude, k=K, temperature=TEMPERATURE)
    want = similar_rank(tf.constant(vectors), _ids(3_000), queries, similar_exclude, k=K, temperature=TEMPERATURE)
    assert (got[0].numpy() == want[0].numpy()).all()
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-5, atol=1e-5)


def test_excluded_items_and_the_item_itself_are_never_returned() -> None:
    vectors = _clustered(3_000, 16, 40, seed=4)
    search = IvfSearch(_index(vectors), vectors, n_probe=8, min_candidates=K + 30)
    users = tf.constant(_clustered(4, 16, 40, seed=5))
    nothing = tf.fill([4, 1], tf.constant(-1, tf.int64))
    unexcluded = search.rank(users, _ids(3_000), nothing, k=K, temperature=1.0)[0].numpy()
    best = np.array([[int(item.decode().split("-")[1]) for item in row[:30]] for row in unexcluded])
    ids = search.rank(users, _ids(3_000), tf.constant(best, tf.int64), k=K, temperature=1.0)[0].numpy()
    for row, before, excluded in zip(ids, unexcluded, best, strict=True):
        assert not {f"item-{n}".encode() for n in excluded} & set(row)
        assert (row[: K - 30] == before[30:]).all()  # the same lists were probed; the rest moves up
    queries = [10, 20, 30]
    excluded_too = [[11, 12], [21, -1], [-1, -1]]
    got = search.similar_rank(
        _ids(3_000), tf.constant(queries, tf.int64), tf.constant(excluded_too, tf.int64), k=K, temperature=1.0
    )[0].numpy()
    for query, dropped, row in zip(queries, excluded_too, got, strict=True):
        assert not {f"item-{n}".encode() for n in [query, *dropped] if n >= 0} & set(row)
        assert (row != b"").all()


def test_few_candidates_are_padded_like_the_exact_path() -> None:
    vectors = _clustered(40, 8, 4, seed=6)
    search = IvfSearch(_index(vectors, lists=4), vectors, n_probe=1)  # one list: fewer than K items
    users = tf.constant(_clustered(2, 8, 4, seed=7))
    ids, scores = search.rank(users, _ids(40), tf.constant([[-1], [-1]], tf.int64), k=K, temperature=TEMPERATURE)
    assert ids.shape == scores.shape == (2, K) and scores.dtype == tf.float32
    for row_ids, row_scores in zip(ids.numpy(), scores.numpy(), strict=True):
        filled = int((row_ids != b"").sum())
        assert 0 < filled <= search.list_size and (row_scores[filled:] == PAD_SCORE).all()
        assert (row_ids[filled:] == b"").all() and np.all(np.diff(row_scores[:filled]) <= 0)
    # asked for K candidates, n_probe grows until any probed lists hold K items: the answer is full
    vectors = _clustered(400, 8, 4, seed=8)
    index = _index(vectors, lists=20)
    nothing = tf.constant([[-1], [-1]], tf.int64)
    short = IvfSearch(index, vectors, n_probe=1).rank(users, _ids(400), nothing, k=K, temperature=TEMPERATURE)[0]
    assert (short.numpy() == b"").any()
    full = IvfSearch(index, vectors, n_probe=1, min_candidates=K)
    assert 1 < full.n_probe < index.n_lists
    assert (full.rank(users, _ids(400), nothing, k=K, temperature=TEMPERATURE)[0].numpy() != b"").all()
    unknown = search.similar_rank(
        _ids(40), tf.constant([-1], tf.int64), tf.constant([[-1]], tf.int64), k=K, temperature=1.0
    )
    assert (unknown[0].numpy() == b"").all() and (unknown[1].numpy() == PAD_SCORE).all()


def test_recall_at_100_on_a_clustered_catalog_at_the_default_n_probe() -> None:
    config = ModelConfig()
    vectors = _clustered(30_000, 32, 400, seed=8, spread=0.6)  # at n_probe 24: recall 0.86
    index = index_for_config(vectors, config)
    search = IvfSearch(index, vectors, n_probe=config.ivf_n_probe)
    users = tf.constant(_clustered(200, 32, 400, seed=9, spread=0.6))
    none = tf.fill([200, 1], tf.constant(-1, tf.int64))
    ids = search.rank(users, _ids(30_000), none, k=K, temperature=TEMPERATURE)[0].numpy()
    exact = rank(users, tf.constant(vectors), _ids(30_000), none, k=K, temperature=TEMPERATURE)[0].numpy()
    recall = np.mean([len(set(got) & set(want)) / K for got, want in zip(ids, exact, strict=True)])
    overlap = np.mean([len(set(got[:10]) & set(want[:10])) / 10 for got, want in zip(ids, exact, strict=True)])
    print(f"IVF recall@100 {recall:.3f}, overlap@10 {overlap:.3f} ({index.n_lists} lists, n_probe {search.n_probe})")
    assert recall >= 0.95


# -- through the export ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large() -> tuple[TwoTowerModel, pd.DataFrame]:
    """3,000 items, above a 1,000-item exact threshold; ids and stream features only."""
    schema = AttributeSchema()
    rng = np.random.default_rng(11)
    events = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(400)],
            "user_id": [f"user-{n}" for n in rng.integers(0, 30, 400)],
            "item_id": [f"item-{n}" for n in rng.integers(0, 3_000, 400)],
            "kind": "view",
            "event_time": pd.to_datetime(np.sort(rng.integers(0, 10**6, 400)), unit="s", utc=True),
        }
    )
    catalog = ItemCatalog.from_items_seen([f"item-{n}" for n in range(3_000)], schema)
    config = dataclasses.replace(
        ModelConfig(attributes=schema),
        embedding_dim=16,
        item_id_buckets=4_096,
        user_id_buckets=256,
        exact_topk_max_items=1_000,
    )
    return build_model(catalog, config), examples_from_interactions(events, None, schema)


def _export(model: TwoTowerModel, examples: pd.DataFrame, base: Path, **config: Any) -> Path:
    """Export ``model`` with its config's retrieval fields replaced by ``config``."""
    original = model.config
    model.config = dataclasses.replace(original, **config)
    try:
        version = export.export_version(model, base, 1, lineage={}, warmup_users=examples.head(4))
    finally:
        model.config = original
    return version


def test_export_above_the_threshold_round_trips_the_index(
    large: tuple[TwoTowerModel, pd.DataFrame], tmp_path: Path
) -> None:
    model, examples = large
    users = examples.tail(5)
    exclude = [list(items[:2]) for items in users["recent_items"]]
    padded = tf.constant([row + [""] * (2 - len(row)) for row in exclude])
    inputs = {name: tf.constant(values) for name, values in user_arrays(users, model.schema).items()}
    # every list probed: the saved index must give the in-memory brute-force answer
    full = _export(model, examples, tmp_path / "full", ivf_n_probe=10**6)
    assert export.read_lineage(full)["retrieval"]["method"] == "ivf"
    loaded = tf.saved_model.load(str(full))
    served = loaded.signatures["recommend"](**inputs, exclude_items=padded)
    ids, scores = recommend(model, users, k=K, exclude=exclude)
    assert (served["item_ids"].numpy().astype(str) == ids).all()
    np.testing.assert_allclose(served["scores"].numpy(), scores, rtol=1e-4, atol=1e-4)
    queries = ["item-3", "item-2999", "not-in-the-catalog"]
    answer = loaded.signatures["similar"](item_id=tf.constant(queries), exclude_items=tf.constant([["item-4"]] * 3))
    memory_ids, _ = similar(model, queries, k=K, exclude=[["item-4"]] * 3)
    assert (answer["item_ids"].numpy().astype(str) == memory_ids).all()
    assert (answer["item_ids"].numpy()[2] == b"").all() and (answer["scores"].numpy()[2] == PAD_SCORE).all()
    # the default n_probe: approximate, but the same contract
    default = _export(model, examples, tmp_path / "default")
    retrieval = export.read_lineage(default)["retrieval"]
    assert retrieval["method"] == "ivf" and retrieval["n_probe"] == min(model.config.ivf_n_probe, retrieval["lists"])
    served = tf.saved_model.load(str(default)).signatures["recommend"](**inputs, exclude_items=padded)
    served_ids = served["item_ids"].numpy().astype(str)
    assert served_ids.shape == (5, K) and (served_ids != "").all()
    vectors = dict(zip(model.catalog.item_ids, catalog_vectors(model), strict=True))
    user_vecs = model.user_tower(inputs).numpy()
    for row, (got, got_scores) in enumerate(zip(served_ids, served["scores"].numpy(), strict=True)):
        assert not set(exclude[row]) & set(got) and len(set(got)) == K
        expected = np.array([vectors[item] for item in got]) @ user_vecs[row] / model.config.temperature
        np.testing.assert_allclose(got_scores, expected, rtol=1e-4, atol=1e-4)


def test_a_catalog_at_the_threshold_keeps_the_exact_path(
    large: tuple[TwoTowerModel, pd.DataFrame], tmp_path: Path
) -> None:
    model, examples = large
    version = _export(model, examples, tmp_path, exact_topk_max_items=3_000)
    assert export.read_lineage(version)["retrieval"] == {"method": "exact"}
