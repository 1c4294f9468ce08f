"""The validation gate and the publish path, on a tiny model (no services).

A candidate that fails any check is rejected *and never published*: no version directory appears
under the model base path, its staging directory is gone, and no trainer checkpoint is kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import REGISTRY

from online_trainer import checkpoint, export
from online_trainer import publish as publish_module
from online_trainer.buffer import ReplayBuffer
from online_trainer.catalog import ItemCatalog
from online_trainer.checkpoint import Checkpoint
from online_trainer.dataset import split_holdout
from online_trainer.examples import examples_from_interactions
from online_trainer.gate import check_export, hits, run_gate, sign_test_p, signature_problems
from online_trainer.history import UserHistories
from online_trainer.inference import recommend
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import clone_for_finetune
from online_trainer.publish import VersionWriter, label_canary, publish_candidate
from online_trainer.settings import TrainerSettings, TrainerTuning
from online_trainer.slices import SliceJudge, holdout_segments, item_interactions
from online_trainer.training import train
from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.settings import PathSettings, SliceTuning
from tests.support.tiny_model import TINY_SCHEMA, write_tiny_model

GENRES = ["Action", "Comedy", "Drama", "Horror"]
SCHEMA = AttributeSchema(
    item=(
        Attribute(name="genres", type="multi_categorical"),
        Attribute(name="year", type="numeric", boundaries=(1992.0, 1995.0)),
    )
)
TINY = ModelConfig(
    attributes=SCHEMA,
    embedding_dim=8,
    item_id_buckets=512,
    user_id_buckets=256,
    attribute_buckets=16,
    profile_dim=4,
    content_dim=4,
    batch_size=64,
    epochs=5,
    learning_rate=0.02,
)


def tiny_catalog() -> ItemCatalog:
    return ItemCatalog.from_frame(
        pd.DataFrame(
            {
                "item_id": [str(i) for i in range(40)],
                "genres": [[GENRES[i % 4]] for i in range(40)],
                "year": [1990 + i % 10 for i in range(40)],
            }
        ),
        SCHEMA,
    )


def tiny_interactions(n: int = 900, seed: int = 0) -> pd.DataFrame:
    """30 users, each only touching items of "their" genre (user u likes genre u % 4)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, size=n)
    items = (rng.integers(0, 10, size=n) * 4 + users % 4).astype(str)
    return pd.DataFrame(
        {
            "event_id": [f"e{seed}-{i}" for i in range(n)],
            "user_id": users.astype(str),
            "item_id": items,
            "event_time": pd.to_datetime(1_000_000 + np.arange(n) * 60, unit="s", utc=True),
        }
    )


@pytest.fixture(scope="module")
def trained() -> tuple[TwoTowerModel, pd.DataFrame, pd.DataFrame]:
    examples = examples_from_interactions(tiny_interactions(), None, SCHEMA)
    fit, holdout = split_holdout(examples, 200)
    model = build_model(tiny_catalog(), TINY)
    train(model, fit, progress=False)
    return model, fit, holdout


def settings_for(tmp_path: Path, **tuning: Any) -> TrainerSettings:
    return TrainerSettings(paths=PathSettings(state_dir=tmp_path), trainer=TrainerTuning(**tuning))


def state_for(examples: pd.DataFrame) -> Checkpoint:
    replay = ReplayBuffer(500)
    replay.add(examples)
    return Checkpoint(UserHistories(), replay, {"offsets": {}})


def assert_nothing_published(settings: TrainerSettings) -> None:
    assert export.list_versions(settings.model_base_path) == []
    staged = list(settings.staging_path.iterdir()) if settings.staging_path.exists() else []
    assert staged == []
    assert checkpoint.load_latest(settings.trainer_state_path, 1, 10) is None


def publish(
    settings: TrainerSettings,
    candidate: Any,
    fit: pd.DataFrame,
    holdout: pd.DataFrame,
    *,
    serving: Any = None,
    margin: float = 0.0,
    lineage: dict[str, Any] | None = None,
    **extra: Any,
) -> Any:
    """``publish_candidate`` with this module's fixed choices (no model server, k=10)."""
    return publish_candidate(
        VersionWriter(settings),
        candidate,
        holdout=holdout,
        serving=serving,
        lineage=lineage or {},
        trainer_state=state_for(fit),
        publisher=None,
        k=10,
        margin=margin,
        **extra,
    )


def test_a_trained_model_passes_and_is_published_with_its_verdict(tmp_path: Path, trained: Any) -> None:
    model, fit, holdout = trained
    settings = settings_for(tmp_path)
    outcome = publish(settings, model, fit, holdout, lineage={"kind": "test"})
    assert outcome.gate.passed, outcome.gate.summary()
    assert outcome.version == 1 and outcome.labelled is False
    # 10 of 40 items share a user's genre, so a model that learned anything beats 10/40 = 0.25
    assert outcome.gate.candidate_metric is not None and outcome.gate.candidate_metric > 0.5
    lineage = export.read_lineage(settings.model_base_path / "1")
    assert lineage["gate"]["passed"] is True and lineage["kind"] == "test"
    assert checkpoint.load_latest(settings.trainer_state_path, 1, 500) is not None


def test_nan_weights_are_rejected_and_never_published(tmp_path: Path, trained: Any) -> None:
    model, fit, holdout = trained
    poisoned = clone_for_finetune(model)
    weights = poisoned.get_weights()
    weights[0] = np.full_like(weights[0], np.nan)
    poisoned.set_weights(weights)
    settings = settings_for(tmp_path)
    outcome = publish(settings, poisoned, fit, holdout, serving=model, margin=0.02)
    assert outcome.gate.reasons == ["nonfinite_weights"] and outcome.version is None
    assert_nothing_published(settings)


def test_a_worse_candidate_is_rejected_for_metric_regression(trained: Any) -> None:
    model, _, holdout = trained
    untrained = build_model(tiny_catalog(), TINY)
    result = run_gate(untrained, holdout, serving=model, export_dir=None, k=10, margin=0.05)
    assert result.reasons == ["metric_regression"]
    assert result.serving_metric is not None and result.candidate_metric is not None
    assert result.candidate_metric < result.serving_metric - 0.05
    # ... and the same model against itself passes with no margin at all
    assert run_gate(model, holdout, serving=model, export_dir=None, k=10, margin=0.0).passed


def test_the_sign_test_matches_the_binomial_tail() -> None:
    assert sign_test_p(5, 0) == pytest.approx(1 / 32)
    assert sign_test_p(3, 3) == pytest.approx(42 / 64)
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 7) == 1.0


def test_a_drop_the_holdout_cannot_show_passes_a_significant_one_fails(trained: Any) -> None:
    """Three lost rows out of three are a drop of 1.0, but a fair coin does that 1 time in 8."""
    model, _, holdout = trained
    untrained = build_model(tiny_catalog(), TINY)
    lost = holdout[hits(model, holdout, k=10) & ~hits(untrained, holdout, k=10)]
    assert len(lost) >= 8
    few, many = lost.head(3), lost.head(8)
    unproven = run_gate(untrained, few, serving=model, export_dir=None, k=10, margin=0.0, alpha=0.05)
    assert unproven.passed, unproven.summary()
    assert unproven.p_value == pytest.approx(1 / 8)
    shown = run_gate(untrained, many, serving=model, export_dir=None, k=10, margin=0.0, alpha=0.05)
    assert shown.reasons == ["metric_regression"] and "sign test p=0.00391" in shown.details[0]
    # alpha 1.0: the margin alone decides, as before the sign test
    assert run_gate(untrained, few, serving=model, export_dir=None, k=10, margin=0.0, alpha=1.0).reasons == [
        "metric_regression"
    ]


def _write_changed_signature(model: Any, base_path: Path, version: int, **_: Any) -> Path:
    """An 'export' whose recommend lost an input and returns float64 scores."""
    import tensorflow as tf

    class Changed(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
        def recommend(self, user_id: tf.Tensor) -> dict[str, tf.Tensor]:
            batch = tf.shape(user_id)[0]
            return {"item_ids": tf.fill([batch, 100], "1"), "scores": tf.zeros([batch, 100], tf.float64)}

    module = Changed()
    target = Path(base_path) / str(version)
    tf.saved_model.save(module, str(target), signatures={"recommend": module.recommend})
    return target


def test_a_changed_signature_is_rejected_and_never_published(
    tmp_path: Path, trained: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, fit, holdout = trained
    monkeypatch.setattr(publish_module.export, "export_version", _write_changed_signature)
    settings = settings_for(tmp_path)
    outcome = publish(settings, model, fit, holdout)
    assert outcome.gate.reasons == ["signature_mismatch"] and outcome.version is None
    detail = " ".join(outcome.gate.details)
    assert "'score' is missing" in detail and "'similar' is missing" in detail
    assert "count_24h" in detail and "float64" in detail
    assert_nothing_published(settings)


def test_contract_table_matches_the_serving_tiny_model_and_nan_outputs_are_caught(tmp_path: Path, trained: Any) -> None:
    import tensorflow as tf

    _, _, holdout = trained
    item_ids = [str(i) for i in range(40)]
    good = write_tiny_model(tmp_path, 1, item_ids=item_ids)
    assert signature_problems(tf.saved_model.load(str(good)), TINY_SCHEMA) == []
    assert run_gate_on_export(good, holdout, TINY_SCHEMA).passed
    # the same model checked against another schema: the user inputs differ
    problems = " ".join(signature_problems(tf.saved_model.load(str(good)), SCHEMA))
    assert "unexpected ['segment', 'tenure_days']" in problems
    nan = write_tiny_model(tmp_path, 2, item_ids=item_ids, nan=True)
    result = run_gate_on_export(nan, holdout, TINY_SCHEMA)
    assert result.reasons == ["export_outputs"]


def run_gate_on_export(path: Path, holdout: pd.DataFrame, schema: AttributeSchema) -> Any:
    from online_trainer.gate import GateResult

    result = GateResult()
    check_export(result, path, holdout, catalog_size=40, schema=schema)
    return result


def test_crash_between_writing_and_renaming_leaves_no_visible_version(tmp_path: Path, trained: Any) -> None:
    model, fit, holdout = trained
    settings = settings_for(tmp_path)

    def crash(step: str) -> None:
        if step == "checkpointed":
            raise KeyboardInterrupt("simulated crash after the checkpoint, before the rename")

    with pytest.raises(KeyboardInterrupt):
        publish(settings, model, fit, holdout, fault=crash)
    assert export.list_versions(settings.model_base_path) == []  # nothing visible to the server
    assert (settings.staging_path / "1" / "saved_model.pb").exists()  # the complete but hidden export
    assert checkpoint.load_latest(settings.trainer_state_path, 1, 10) is not None  # an orphan
    removed = VersionWriter(settings).recover()
    assert settings.staging_path in removed
    assert checkpoint.load_latest(settings.trainer_state_path, 1, 10) is None
    assert VersionWriter(settings).next_version() == 1  # the retry gets the same version number


class RecordingPublisher:
    """A stand-in at the gRPC boundary: records label moves, or fails like an unreachable server."""

    def __init__(self, labels: dict[str, int] | None = None, *, reachable: bool = True) -> None:
        self.published: list[int] = []
        self._labels = labels or {}
        self.reachable = reachable

    def publish_canary(self, version: int) -> None:
        from serving.model_client import ModelServerRpcError

        if not self.reachable:
            import grpc

            raise ModelServerRpcError("HandleReloadConfigRequest", grpc.StatusCode.UNAVAILABLE, "connection refused")
        self.published.append(version)
        self._labels["canary"] = version
        self._labels.setdefault("stable", version)

    def labels(self) -> dict[str, int]:
        return dict(self._labels)


def test_retention_never_removes_a_labelled_version(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, retention=2)
    writer = VersionWriter(settings)
    for version in range(1, 6):  # prune only reads version directory names
        (settings.model_base_path / str(version)).mkdir(parents=True)
    writer.mark_labelled(5)
    assert writer.prune(RecordingPublisher({"stable": 1, "canary": 5})) == [2, 3]
    assert export.list_versions(settings.model_base_path) == [1, 4, 5]


def test_an_unreachable_model_server_leaves_the_version_unlabelled(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    writer = VersionWriter(settings)
    publisher = RecordingPublisher()
    assert label_canary(writer, publisher, 1) is True
    assert writer.labelled_version() == 1 and publisher.labels() == {"canary": 1, "stable": 1}
    publisher.reachable = False
    assert label_canary(writer, publisher, 2) is False
    assert writer.labelled_version() == 1  # the trainer's next start labels the newest version


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_nonfinite_loss_or_gradient_norm_is_never_published_even_with_finite_weights(
    tmp_path: Path, trained: Any
) -> None:
    model, fit, holdout = trained
    assert publish(settings_for(tmp_path / "ok"), model, fit, holdout).gate.passed
    assert sample("trainer_gate_consecutive_rejections") == 0
    finite = {"loss": 1.5, "gradient_norm_mean": 0.5, "gradient_norm_max": 0.9, "examples_per_s": 10.0}
    for rejections, figure in enumerate(("loss", "gradient_norm_mean", "gradient_norm_max"), start=1):
        settings = settings_for(tmp_path / figure)
        outcome = publish(settings, model, fit, holdout, training={**finite, figure: float("inf")})
        assert outcome.gate.reasons == ["nonfinite"] and figure in outcome.gate.details[0]
        assert_nothing_published(settings)
        assert sample("trainer_gate_consecutive_rejections") == rejections
    assert publish(settings_for(tmp_path / "again"), model, fit, holdout, training=finite).gate.passed
    assert sample("trainer_gate_consecutive_rejections") == 0


def _wins_overall_loses_purchases(model: TwoTowerModel, fit: pd.DataFrame, holdout: pd.DataFrame) -> Any:
    """A serving model (untrained) and a hold-out on which ``model`` wins 60 "view" rows and loses
    all 20 "purchase" rows: rows whose positive is an item only the serving model ranks in its top 10."""
    serving = build_model(tiny_catalog(), TINY)
    rows = pd.concat([fit, holdout], ignore_index=True)
    won = rows[hits(model, rows, k=10) & ~hits(serving, rows, k=10)].head(60).assign(kind="view")
    candidate_top, _ = recommend(model, rows, k=10)
    serving_top, _ = recommend(serving, rows, k=10)
    only_serving = [[item for item in s if item not in set(c)] for c, s in zip(candidate_top, serving_top, strict=True)]
    picked = [index for index, items in enumerate(only_serving) if items][:20]
    lost = rows.iloc[picked].assign(item_id=[only_serving[index][0] for index in picked], kind="purchase")
    assert len(won) == 60 and len(lost) == 20
    return serving, pd.concat([won, lost], ignore_index=True), len(lost)


JUDGE_TUNING = SliceTuning(min_examples=10, flag_loss=0.2)


def test_a_candidate_that_wins_overall_but_loses_a_segment_badly_is_flagged(tmp_path: Path, trained: Any) -> None:
    model, fit, holdout = trained
    serving, case, lost = _wins_overall_loses_purchases(model, fit, holdout)
    flags_before = sample("trainer_gate_slice_flags_total", segment="event_kind=purchase")
    settings = settings_for(tmp_path)
    judge = SliceJudge(JUDGE_TUNING, item_interactions={}, block=False)
    outcome = publish(settings, model, fit, case, serving=serving, slices=judge)
    assert outcome.gate.passed and outcome.version == 1, outcome.gate.summary()
    assert outcome.gate.candidate_metric == pytest.approx(60 / (60 + lost))
    assert outcome.gate.flagged_segments == ["event_kind=purchase"]
    figures = export.read_lineage(settings.model_base_path / "1")["slices"]
    assert figures["event_kind=purchase"] == {"examples": lost, "candidate": 0.0, "serving": 1.0, "flagged": True}
    assert figures["event_kind=view"] == {"examples": 60, "candidate": 1.0, "serving": 0.0, "flagged": False}
    assert figures["item_popularity=tail"]["examples"] == 60 + lost  # no item has interactions
    assert sample("trainer_gate_slice_flags_total", segment="event_kind=purchase") == flags_before + 1
    assert sample("trainer_gate_slice_hit_at_k", segment="event_kind=purchase", model="candidate") == 0.0
    assert sample("trainer_gate_slice_hit_at_k", segment="event_kind=purchase", model="serving") == 1.0

    # trainer.block_on_slice_flag: the same candidate is rejected and never published
    blocked_settings = settings_for(tmp_path / "blocked", block_on_slice_flag=True)
    blocking = SliceJudge(JUDGE_TUNING, item_interactions={}, block=blocked_settings.trainer.block_on_slice_flag)
    blocked = publish(blocked_settings, model, fit, case, serving=serving, slices=blocking)
    assert blocked.gate.reasons == ["slice"] and "event_kind=purchase" in blocked.gate.details[0]
    assert_nothing_published(blocked_settings)
    assert TrainerTuning().block_on_slice_flag is False


def test_a_segment_is_flagged_only_with_enough_rows_a_big_loss_and_an_overall_win(trained: Any) -> None:
    model, fit, holdout = trained
    serving, case, lost = _wins_overall_loses_purchases(model, fit, holdout)

    def flagged(tuning: SliceTuning, candidate: Any = model, against: Any = serving) -> list[str]:
        judge = SliceJudge(tuning, item_interactions={})
        result = run_gate(candidate, case, serving=against, export_dir=None, k=10, margin=0.0, slices=judge)
        return result.flagged_segments

    assert flagged(JUDGE_TUNING) == ["event_kind=purchase"]
    assert flagged(SliceTuning(min_examples=lost + 1)) == []  # too few purchase rows to judge
    assert flagged(SliceTuning(min_examples=10, flag_loss=1.0)) == []  # any loss tolerated
    assert flagged(JUDGE_TUNING, candidate=serving, against=model) == []  # loses overall: the margin rejects it


def test_item_popularity_comes_from_the_replay_buffer(trained: Any) -> None:
    model, fit, holdout = trained
    replay = ReplayBuffer(100)  # a uniform sample of fit's rows: counts are scaled by seen / kept
    replay.add(fit)
    counts = item_interactions(replay)
    assert sum(counts.values()) == pytest.approx(len(fit), rel=0.05)
    exact = ReplayBuffer(10_000)
    exact.add(fit)
    assert item_interactions(exact) == fit["item_id"].astype(str).value_counts().to_dict()
    judge = SliceJudge(SliceTuning(item_popularity_bounds=(10, 25)), item_interactions(exact))
    bands = [labels[2] for labels in holdout_segments(holdout, judge)]
    expected = [
        "item_popularity=" + ("head" if n >= 25 else "torso" if n >= 10 else "tail")
        for n in holdout["item_id"].astype(str).map(item_interactions(exact)).fillna(0)
    ]
    assert bands == expected


def test_slice_gauges_of_segments_the_last_gate_lacked_read_nan() -> None:
    from online_trainer import metrics

    metrics.record_slices({"event_kind=gift": {"examples": 3, "candidate": 0.5, "serving": 0.25, "flagged": False}})
    metrics.record_slices({"event_kind=loan": {"examples": 3, "candidate": 0.75, "serving": None, "flagged": False}})
    assert math.isnan(sample("trainer_gate_slice_hit_at_k", segment="event_kind=gift", model="candidate"))
    assert sample("trainer_gate_slice_hit_at_k", segment="event_kind=loan", model="candidate") == 0.75
    no_serving = {"segment": "event_kind=loan", "model": "serving"}
    assert REGISTRY.get_sample_value("trainer_gate_slice_hit_at_k", no_serving) is None
