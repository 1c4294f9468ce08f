"""``ModelConfig``: the two-tower model's shape, features and training hyperparameters.

It carries the dataset's :class:`~streamrec.core.attributes.AttributeSchema` (``attributes``): the
towers are built from the declared attributes, so the schema is part of what a model *is*. Saved
with every exported version (``assets.extra/model_config.json``), so a version is rebuilt exactly
as it was trained (:meth:`ModelConfig.from_json`); a version exported before the schema existed
(issue 20) cannot be resumed and says so.
See docs/design/trainer.md#how-the-model-defaults-were-chosen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema
from streamrec.core.errors import DatasetError


@dataclass(frozen=True)
class ModelConfig:
    """Table sizes, which features each tower uses, the loss and the optimizer's settings."""

    # The declared user and item attributes (and event kinds) the towers read.
    attributes: AttributeSchema = AttributeSchema()
    embedding_dim: int = 64
    item_id_buckets: int = 32_768
    user_id_buckets: int = 32_768
    # Hash buckets of each categorical / multi-categorical attribute's table.
    attribute_buckets: int = 1_024
    profile_dim: int = 16  # embedding size of each user attribute
    content_dim: int = 16  # embedding size of each item attribute
    use_user_id: bool = True
    use_profile: bool = True  # the declared user attributes
    use_recent_items: bool = True
    # The newest recent items' own embeddings beside the mean of all of them: the user's last
    # steps, which the mean blurs (ml-100k users rate in bursts, one title leading to the next).
    use_last_item: bool = True
    last_items: int = 3  # how many of the newest recent items that slot averages
    # The recent items weighted by position (a learned weight per slot, newest first; all equal at
    # the start, which is the plain mean): how fast a user's taste moves on is learned, not fixed.
    use_position_weights: bool = True
    use_counts: bool = True
    use_item_id: bool = True
    use_item_content: bool = True  # the declared item attributes
    init_stddev: float = 0.05
    # Adam updates only the embedding rows a batch touched (``optimizer.LazyAdam``); False: Keras'
    # dense Adam, which rewrites whole 32k-row tables and their moments every step.
    lazy_embedding_updates: bool = True
    learning_rate: float = 0.005
    # Fine-tuning continues the bootstrap's run (Adam state carried over) with a smaller step.
    finetune_learning_rate: float = 0.002
    batch_size: int = 1_024
    finetune_batch_size: int = 256  # an interval holds few examples: smaller batches, more steps
    # Softmax over the whole catalog instead of the in-batch candidates (``losses.full_catalog_loss``),
    # for the bootstrap too (fine-tuning follows ``trainer.finetune_loss``), so the first
    # fine-tunes do not switch losses.
    full_catalog: bool = True
    temperature: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    epochs: int = 4  # bootstrap epochs: the best validation epoch with lazy Adam
    seed: int = 0
    # Retrieval in the exported `recommend` and `similar` (online_trainer/retrieval_index.py): a
    # catalog up to this size is ranked exactly (brute force); a larger one through an IVF index
    # built at export, which scores ivf_n_probe of its ~ivf_lists_per_sqrt_n * sqrt(N) lists.
    exact_topk_max_items: int = 20_000
    ivf_lists_per_sqrt_n: float = 4.0
    ivf_n_probe: int = 96
    ivf_max_list_factor: float = 1.5  # a list above this multiple of the mean size is split
    ivf_kmeans_iterations: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.last_items <= contracts.RECENT_ITEMS_MAX:
            raise ValueError(
                f"ModelConfig.last_items must be between 1 and {contracts.RECENT_ITEMS_MAX} (the recent items "
                f"a user has), got {self.last_items}"
            )
        if self.exact_topk_max_items < 0 or self.ivf_n_probe < 1 or self.ivf_kmeans_iterations < 1:
            raise ValueError(
                "ModelConfig: exact_topk_max_items must be >= 0, ivf_n_probe and ivf_kmeans_iterations >= 1; got "
                f"{self.exact_topk_max_items}, {self.ivf_n_probe}, {self.ivf_kmeans_iterations}"
            )
        if self.ivf_lists_per_sqrt_n <= 0 or self.ivf_max_list_factor < 1:
            raise ValueError(
                "ModelConfig: ivf_lists_per_sqrt_n must be > 0 and ivf_max_list_factor >= 1 (a multiple of the "
                f"mean list size); got {self.ivf_lists_per_sqrt_n}, {self.ivf_max_list_factor}"
            )

    @property
    def schema(self) -> AttributeSchema:
        return self.attributes

    def to_json(self) -> dict[str, Any]:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values["attributes"] = self.attributes.model_dump(mode="json")
        return values

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ModelConfig:
        """The config saved by :meth:`to_json`; one saved before issue 20 (no ``attributes``) is refused."""
        if "attributes" not in payload:
            raise DatasetError(
                "this model version was exported before the towers were built from the dataset's declared "
                "attributes (issue 20) and cannot be resumed; retrain with `streamrec train --until ...`"
            )
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in payload.items() if key in known}
        values["attributes"] = AttributeSchema.model_validate(payload["attributes"])
        return cls(**values)
