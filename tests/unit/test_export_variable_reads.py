"""No exported variable is both gathered from and read whole, in any signature.

A gather on a TF resource variable (``ResourceGather``) puts it in copy-on-read mode for good, and
from then on every whole read (``ReadVariableOp``) copies it. The model server replays a
``similar`` warm-up request before it serves, so a catalog variable read both ways would make
every ``recommend`` copy the whole catalog (docs/design/trainer.md#retrieval-over-large-catalogs).
Checked on the exact and the IVF graph.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pandas as pd
import pytest
import tensorflow as tf

from online_trainer.catalog import ItemCatalog
from online_trainer.export import _signatures, serving_module
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from streamrec.core.attributes import Attribute, AttributeSchema

SCHEMA = AttributeSchema(
    user=(Attribute(name="tier", type="categorical"),),
    item=(
        Attribute(name="category", type="categorical"),
        Attribute(name="price", type="numeric", boundaries=(5.0, 20.0)),
        Attribute(name="tags", type="multi_categorical", max_tokens=2),
    ),
)
SPARSE_READS = {"ResourceGather", "ResourceGatherNd"}


@pytest.mark.parametrize("exact_topk_max_items", [10_000, 500], ids=["exact", "ivf"])
def test_no_variable_is_gathered_from_and_read_whole(exact_topk_max_items: int) -> None:
    items = pd.DataFrame(
        {
            "item_id": [f"sku-{n}" for n in range(1_200)],
            "category": ["shoes", "hats", ""] * 400,
            "price": [float(n % 30) for n in range(1_200)],
            "tags": [["a"], ["a", "b"], []] * 400,
        }
    )
    config = dataclasses.replace(
        ModelConfig(attributes=SCHEMA),
        embedding_dim=8,
        item_id_buckets=1_024,
        user_id_buckets=64,
        attribute_buckets=16,
        exact_topk_max_items=exact_topk_max_items,
    )
    module = serving_module(build_model(ItemCatalog.from_frame(items, SCHEMA), config))
    assert (module.ivf is None) == (exact_topk_max_items >= len(items))
    reads: dict[int, set[str]] = defaultdict(set)
    names: dict[int, str] = {}
    for function in _signatures(module, SCHEMA).values():
        assert not [op.type for op in function.graph.get_operations() if op.type.endswith("PartitionedCall")]
        for variable, placeholder in function.graph.captures:
            if placeholder.dtype == tf.resource:
                names[id(variable)] = str(variable)[:90]
                reads[id(variable)] |= {consumer.type for consumer in placeholder.consumers()}
    assert any(ops & SPARSE_READS for ops in reads.values())  # the check sees the catalog's gathers
    both = sorted(names[key] for key, ops in reads.items() if ops & SPARSE_READS and "ReadVariableOp" in ops)
    assert not both, f"gathered from and read whole (copied on every read): {both}"
