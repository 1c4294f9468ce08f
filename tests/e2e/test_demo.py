"""``streamrec demo`` itself, on the MovieLens preset as shipped and on a log that looks nothing
like MovieLens (UUID-like ids, millisecond timestamps, view/addtocart/transaction, an item file
with other attributes, no user file): stack, feature setup, replay -> worker, bootstrap, trainer
publishing canaries, API, joiner, evaluator, simulator and the report, all real processes.

Smaller than the shipped demo (part of the history, a few hundred visits, a short trainer
interval) so that it fits ``make test``; the code path is the one ``make demo`` runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest

from serving.api.proto import generated
from streamrec.core.settings import PathSettings
from streamrec.datasets.shop import ShopShape, write_shop
from streamrec.ops.demo import DemoOptions, run
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.local_stack import LocalStack

NEW_ITEM = "item-first-seen-in-the-stream"


@pytest.fixture
def demo_environment() -> Iterator[None]:
    """The demo sets STREAMREC_* for its processes in this process too; put them back afterwards."""
    saved = dict(os.environ)
    os.environ["STREAMREC_EVALUATOR__SNAPSHOT_INTERVAL_S"] = "2"
    yield
    os.environ.clear()
    os.environ.update(saved)


def small_demo(dataset: str, state_dir: Path, **changes: object) -> DemoOptions:
    options = {
        "dataset": dataset,
        "history_fraction": 0.2,
        "visits": 600,
        "rate": 15.0,
        "trainer_interval_s": 10.0,
        "label_window_s": 2.0,
        "state_dir": state_dir,
        **changes,
    }
    return DemoOptions(**options)  # type: ignore[arg-type]


def check_loop(state_dir: Path, page: Path) -> pd.DataFrame:
    """The report is written, a trainer-published version answered, the evaluator saw labeled traffic."""
    assert page.is_file() and (page.parent / "summary.json").is_file()
    responses = pd.read_parquet(state_dir / "simulator" / "responses.parquet")
    assert len(responses) == 600
    assert (responses["model_version"] >= 2).any(), responses.groupby(["arm", "model_version"]).size()
    timeline = [json.loads(line) for line in (state_dir / "evaluator" / "timeline.jsonl").read_text().splitlines()]
    assert any(point["stable"]["requests"] + point["canary"]["requests"] > 0 for point in timeline)
    return responses


def test_demo_as_shipped_runs_the_loop(demo_environment: None, tmp_path: Path) -> None:
    state_dir = tmp_path / "demo"
    page = run(small_demo("ml-100k", state_dir))
    responses = check_loop(state_dir, page)
    assert responses["item_id"].str.fullmatch(r"\d+").all()  # MovieLens ids


def test_demo_on_a_shop_log_with_kinds_and_an_item_file(demo_environment: None, tmp_path: Path) -> None:
    description = write_shop(tmp_path / "shop", ShopShape(n_events=8_000, n_items=400, n_users=300))
    events = pd.read_csv(tmp_path / "shop" / "events.csv")
    # An item that is in no item file shows up in the visited part of the stream (history 20 %,
    # then 600 visits: about the next 7 %).
    late = events.iloc[int(len(events) * 0.205) : int(len(events) * 0.25) : 6].assign(itemid=NEW_ITEM)
    events = pd.concat([events, late.assign(timestamp=late["timestamp"] + 1)]).sort_values("timestamp", kind="stable")
    events.to_csv(tmp_path / "shop" / "events.csv", index=False)
    state_dir = tmp_path / "demo"
    try:
        page = run(small_demo(str(description), state_dir, keep_running=True))
        check_loop(state_dir, page)
        stubs = generated()
        api_target = os.environ["STREAMREC_SIMULATOR__API_TARGET"]
        with grpc.insecure_channel(api_target) as channel:
            stub = stubs.grpc.RecommenderStub(channel)
            user = str(events["visitorid"].iloc[-1])
            answer = stub.Recommend(stubs.pb2.RecommendRequest(user_id=user, k=10), timeout=10)
            assert len(answer.items) == 10 and not answer.degraded and answer.model_version >= 1
            item = str(events["itemid"].iloc[0])
            similar = stub.SimilarItems(stubs.pb2.SimilarItemsRequest(item_id=item, k=5), timeout=10)
            assert len(similar.items) == 5 and not similar.fallback
            assert item not in {entry.item_id for entry in similar.items}
    finally:
        LocalStack(StackSettings(paths=PathSettings(state_dir=state_dir))).down()
    versions = sorted(int(path.name) for path in (state_dir / "models" / "streamrec").iterdir() if path.name.isdigit())
    newest = state_dir / "models" / "streamrec" / str(versions[-1]) / "assets.extra" / "catalog.json"
    assert NEW_ITEM in json.loads(newest.read_text())["item_ids"]  # the model ranks it from the next version on
