"""Quantized serving tables: a version whose hashed embedding tables are float16 or int8.

The served answers stay close to the float32 version's, the variables shrink, the resume files
keep the float32 weights, and a later export of the same model object serves its new weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from online_trainer import export, quantize
from online_trainer.model import TwoTowerModel
from online_trainer.model_state import weights_by_path
from online_trainer.training import train
from streamrec.core import contracts
from tests.unit.test_export_savedmodel import SCHEMA, _inputs, tiny  # noqa: F401 -- the module's fixture

pytestmark = pytest.mark.unit
LINEAGE = {"data_range": ["a", "b"], "parent_version": None, "feature_service": contracts.USER_FEATURE_SERVICE}


def _variables_bytes(version: Path) -> int:
    return sum(path.stat().st_size for path in (version / "variables").iterdir())


def _top10(version: Path, users: pd.DataFrame) -> np.ndarray:
    loaded = tf.saved_model.load(str(version))
    exclude = tf.constant(np.full((len(users), 1), "", dtype=object))
    ids = loaded.signatures["recommend"](**_inputs(users), exclude_items=exclude)["item_ids"].numpy()
    return np.asarray(ids[:, :10].astype(str))


def _overlap(left: np.ndarray, right: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(left, right, strict=True)]))


@pytest.fixture(scope="module")
def versions(
    tiny: tuple[TwoTowerModel, pd.DataFrame],  # noqa: F811 -- the imported fixture
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    model, examples = tiny
    base = tmp_path_factory.mktemp("quantized")
    return {
        dtype: export.export_version(
            model, base, number, lineage=LINEAGE, warmup_users=examples.head(5), table_dtype=dtype
        )
        for number, dtype in enumerate(quantize.TABLE_DTYPES, start=1)
    }


def test_quantized_versions_answer_as_the_float32_one_and_are_smaller(
    versions: dict[str, Path],
    tiny: tuple[TwoTowerModel, pd.DataFrame],  # noqa: F811
) -> None:
    _, examples = tiny
    users = examples.tail(40)
    reference = _top10(versions["float32"], users)
    assert _overlap(_top10(versions["float16"], users), reference) >= 0.95
    assert _overlap(_top10(versions["int8"], users), reference) >= 0.8
    sizes = {dtype: _variables_bytes(path) for dtype, path in versions.items()}
    # the tiny model's hashed tables are most of its variables (2,048 + 512 + attribute rows x 8);
    # at dim 8 an int8 row with its float32 scale is 12 bytes against 32 (at dim 64: 68 against 256)
    assert sizes["int8"] < sizes["float16"] < 0.65 * sizes["float32"]
    assert sizes["int8"] < 0.5 * sizes["float32"]
    for dtype, path in versions.items():
        assert export.read_lineage(path)["table_dtype"] == dtype


def test_the_resume_files_keep_the_float32_weights(
    versions: dict[str, Path],
    tiny: tuple[TwoTowerModel, pd.DataFrame],  # noqa: F811
) -> None:
    model, _ = tiny
    resumed = export.load_for_finetune(versions["int8"])
    for name, values in weights_by_path(model).items():
        np.testing.assert_array_equal(weights_by_path(resumed)[name], values)
    assert all(layer.serving_table is None for layer in quantize.hashed_tables(model))  # training unaffected


def test_int8_rows_are_within_half_a_step_of_the_float32_ones() -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(0, 0.05, (100, 16)).astype(np.float32)
    table[7] = 0.0  # an all-zero row (never looked up) keeps a usable scale
    stored, scales = quantize.quantize(table, "int8")
    assert stored.dtype == np.int8 and scales is not None
    restored = stored.astype(np.float32) * scales[:, None]
    assert np.all(np.abs(restored - table) <= scales[:, None] / 2 + 1e-9)
    assert np.all(restored[7] == 0.0)
    with pytest.raises(ValueError, match="use one of"):
        quantize.quantize(table, "float32")


def test_a_second_quantized_export_of_one_model_object_serves_its_new_weights(
    tiny: tuple[TwoTowerModel, pd.DataFrame],  # noqa: F811
    tmp_path: Path,
) -> None:
    model, examples = tiny
    copy = export.load_for_finetune(
        export.export_version(model, tmp_path / "first", 1, lineage=LINEAGE, warmup_users=examples.head(5))
    )
    first = export.export_version(copy, tmp_path, 1, lineage=LINEAGE, warmup_users=examples.head(5), table_dtype="int8")
    kept = copy._serving_copies["int8"]
    train(copy, examples, epochs=2, progress=False)
    second = export.export_version(
        copy, tmp_path, 2, lineage=LINEAGE, warmup_users=examples.head(5), table_dtype="int8"
    )
    assert copy._serving_copies["int8"] is kept  # updated in place: one trace per model object
    users = examples.tail(40)
    fresh = export.export_version(
        export.load_for_finetune(second), tmp_path / "fresh", 1, lineage=LINEAGE, warmup_users=examples.head(5),
        table_dtype="int8",
    )  # fmt: skip
    assert (_top10(second, users) == _top10(fresh, users)).all()
    assert not (_top10(first, users) == _top10(second, users)).all()
