"""Online trainer: CPU fine-tuning throughput and the time from "interval ends" to "version published".

Both figures come from the trainer's own code path (``online_trainer.loop.OnlineTrainer``), on
``--dataset`` (a ``streamrec.datasets.description.load_dataset`` spec, default ml-100k), with the
production ``ModelConfig`` unless ``--tiny``:

* ``trainer.examples_per_s``: examples x epochs / seconds of one interval's fine-tune
  (``train`` on the new examples plus the replay sample), median over the intervals after the
  first. Target >= 20,000. The trainer traces the training step of
  both objects it alternates between when it resumes (``finetune.training_pair``), before its
  first interval; the first interval is still reported on its own
  (``trainer.first_interval_examples_per_s``) as the one that meets each code path's first call.
  Every interval trains a model object that no longer serves (``OnlineTrainer._spare``), as in
  production. The model server runs in this process (its loads
  and warm-ups share the two cores with the next fine-tune now and then, which the median over
  the last three intervals absorbs; ml-100k holds four intervals of 20,000 after a bootstrap).
* ``trainer.publish_s``: ``IntervalReport.publish_s``, from the moment the interval ends (the
  trainer stops collecting) to the canary label pointing at the new version on a running local
  model server: example assembly, fine-tune, in-memory gate, export into staging, export gate,
  checkpoint, rename, load + warm-up by the server, label move. Target <= 3 s; the median is
  over the intervals after the first, the max over all of them, and ``trainer.stage.*`` split
  the median into stages (``IntervalReport.stage_s``). Kafka is not involved (events go to
  ``OnlineTrainer.ingest`` directly; the offset commit after publishing is a few ms) and user and
  item attributes come from the dataset's frames (``lookup.FrameLookup``) instead of Feast online
  (one cached Redis read per new user in production).

Setup, not measured: a bootstrap model trained for one epoch on the events before the last
``--runs`` x ``--examples`` (at most the first half). Each run then feeds the next ``--examples``
events (default: ``trainer.max_examples``, the size at which an interval ends early) and runs one
interval.

Run: ``.venv/bin/python -m bench.trainer_throughput`` (``--tiny --no-write`` checks it in a minute).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from bench.common import write_result
from online_trainer.buffer import ReplayBuffer
from online_trainer.catalog import ItemCatalog
from online_trainer.checkpoint import Checkpoint
from online_trainer.examples import examples_from_interactions, positive_examples
from online_trainer.history import UserHistories
from online_trainer.lookup import FrameLookup
from online_trainer.loop import OnlineTrainer
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.publish import VersionWriter, publish_candidate
from online_trainer.settings import TrainerSettings, TrainerTuning
from online_trainer.training import train
from serving.model_client import ModelServerClient
from serving.model_server.core import CoreOptions
from serving.model_server.server import ModelServer, ServerOptions
from serving.settings import ModelServerSection
from streamrec.core import contracts
from streamrec.core.attributes import write_schema
from streamrec.core.events import Interaction
from streamrec.core.settings import PathSettings
from streamrec.datasets.description import load_dataset

TINY = ModelConfig(embedding_dim=16, item_id_buckets=4096, user_id_buckets=2048, attribute_buckets=64, batch_size=256)


def events(frame: pd.DataFrame) -> list[Interaction]:
    times = [stamp.to_pydatetime() for stamp in pd.to_datetime(frame["event_time"], utc=True)]
    columns = (frame["event_id"], times, frame["user_id"], frame["item_id"], frame["kind"])
    return [
        Interaction(event_id=str(event_id), event_time=when, user_id=str(user), item_id=str(item), kind=kind)
        for event_id, when, user, item, kind in zip(*columns, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--runs", type=int, default=4, help="intervals; the first is reported on its own")
    parser.add_argument("--examples", type=int, default=TrainerTuning().max_examples, help="new examples per interval")
    parser.add_argument("--tiny", action="store_true", help="small model and data: checks the script, not a figure")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = load_dataset(args.dataset)
    print(dataset.summary())
    schema = dataset.schema
    config = dataclasses.replace(TINY if args.tiny else ModelConfig(), attributes=schema)
    per_interval = min(args.examples, 500) if args.tiny else args.examples

    interactions = dataset.interactions
    catalog = ItemCatalog.for_dataset(dataset.items, interactions["item_id"].astype(str), schema)
    split = min(len(interactions) // 2, len(interactions) - args.runs * per_interval) if not args.tiny else 3000
    if args.runs < 2:
        raise SystemExit("--runs must be >= 2: the first interval is reported apart from the steady ones")
    history, stream = interactions.iloc[:split], interactions.iloc[split:]
    if len(stream) < args.runs * per_interval:
        raise SystemExit(f"only {len(stream):,} events after the bootstrap half; lower --runs or --examples")

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as state:
        tuning = TrainerTuning(max_examples=per_interval, interval_s=3600, metrics_port=0, gate_margin=1.0)
        settings = TrainerSettings(paths=PathSettings(state_dir=Path(state)), trainer=tuning)
        write_schema(settings.data_dir, schema)  # what `streamrec features setup --dataset` leaves
        print(f"bootstrap: 1 epoch on {len(history):,} events (not measured)")
        every_kind = examples_from_interactions(history, dataset.users, schema)
        examples = positive_examples(every_kind, tuning.positive_kinds)
        model = build_model(catalog, config)
        train(model, examples, epochs=1, kind_weights=tuning.kind_weights)
        replay = ReplayBuffer(tuning.replay_buffer_size)
        replay.add(examples)
        writer = VersionWriter(settings)
        state_now = Checkpoint(UserHistories.from_interactions(history), replay, {"offsets": {}})
        publish_candidate(writer, model, holdout=examples.tail(200), serving=None, lineage={"kind": "bench"},
                          trainer_state=state_now, publisher=None, k=10, margin=1.0)  # fmt: skip

        server = ModelServer(
            ServerOptions(host="127.0.0.1", port=0, model_name=contracts.MODEL_NAME,
                          model_base_path=settings.model_base_path, file_system_poll_wait_seconds=0.2,
                          core=CoreOptions(max_num_load_retries=0, initial_load_timeout_s=300))
        ).start()  # fmt: skip
        try:
            settings = settings.model_copy(update={"model_server": ModelServerSection(port=server.port)})
            client = ModelServerClient.from_settings(settings)
            lookup = FrameLookup(schema, dataset.users, dataset.items)
            trainer = OnlineTrainer(settings, publisher=client, lookup=lookup)
            trainer.resume()
            throughput, publish, stages = [], [], []
            for run in tqdm(range(args.runs), desc="intervals", unit="interval"):
                for event in events(stream.iloc[run * per_interval : (run + 1) * per_interval]):
                    trainer.ingest(event)
                report = trainer.run_interval()
                if report is None or report.publish_s is None:
                    raise SystemExit(f"interval {run} published nothing: {report and report.outcome}")
                throughput.append(report.train_stats["examples_per_s"])
                publish.append(report.publish_s)
                stages.append(report.stage_s)
                tqdm.write(
                    f"interval {run}: {report.new_examples:,} new + {report.replayed:,} replayed, "
                    f"{throughput[-1]:,.0f} examples/s, published in {publish[-1]:.2f} s (version {report.version})"
                )
                tqdm.write("  stages: " + ", ".join(f"{name} {value:.2f}" for name, value in report.stage_s.items()))
            trainer.close()
            client.close()
        finally:
            server.stop(grace_s=1.0)

    metrics = {
        "trainer.examples_per_s": statistics.median(throughput[1:]),
        "trainer.publish_s": statistics.median(publish[1:]),
        "trainer.publish_max_s": max(publish),
        "trainer.first_interval_examples_per_s": throughput[0],
        "trainer.first_interval_publish_s": publish[0],
    }
    for name in stages[-1]:
        metrics[f"trainer.stage.{name}"] = statistics.median(stage.get(name, 0.0) for stage in stages[1:])
    print({name: round(value, 2) for name, value in metrics.items()})
    if args.no_write:
        return
    write_result(
        "trainer" if dataset.name == "ml-100k" else f"trainer-{dataset.name}",
        metrics,
        {name: "examples/s" if name.endswith("examples_per_s") else "s" for name in metrics},
        targets={"trainer.examples_per_s": ">= 20,000", "trainer.publish_s": "<= 3"},
        command=" ".join(["python -m bench.trainer_throughput", *sys.argv[1:]]),
        notes=(
            f"{args.runs} intervals of {per_interval:,} new {dataset.name} events each after a bootstrap on the first "
            f"{split:,} (plus the replay sample, "
            f"replay_fraction {tuning.replay_fraction}), {'tiny' if args.tiny else 'production'} ModelConfig, "
            "local model server in the same process, attributes from the dataset's frames (no Feast). "
            "Medians over the intervals after the first; the first (the first call of each code path; the "
            "training step is traced when the trainer resumes) on its own. Per interval: examples/s "
            f"{', '.join(f'{value:,.0f}' for value in throughput)}; publish s "
            f"{', '.join(f'{value:.2f}' for value in publish)}."
        ),
    )


if __name__ == "__main__":
    main()
