"""Replay producer throughput into a real local broker, against the raw-producer floor.

Both are measured in the same run on the same broker, 5 times each, alternating:

* replay: ``streamrec.ops.replay.replay`` on MovieLens-100K (validation, JSON, produce, wait for acks);
* floor: confluent-kafka producing the same events as pre-serialized bytes with the same
  producer config (acks=all, idempotence, batching), so only our per-event work differs.

Run: ``make bench`` (or ``.venv/bin/python -m bench.replay_throughput``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka import Producer
from tqdm import tqdm

from bench.common import write_result
from streamrec.core.settings import KafkaSettings, PathSettings, RedisSettings
from streamrec.datasets import movielens
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.replay import interactions_from_frame, producer_config, replay
from streamrec.ops.settings import ReplaySettings, StackSettings, StackTuning
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_ports

RUNS = 5


def floor_run(settings: ReplaySettings, payloads: list[tuple[bytes, bytes]]) -> float:
    producer = Producer(producer_config(settings))
    topic = settings.topics.interactions
    started = time.monotonic()
    for key, value in payloads:
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("floor run: not every message was delivered")
    return len(payloads) / (time.monotonic() - started)


def main() -> None:
    kafka_port, controller_port, redis_port = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as state:
        stack_settings = StackSettings(
            redis=RedisSettings(port=redis_port),
            paths=PathSettings(state_dir=Path(state)),
            stack=StackTuning(kafka_port=kafka_port, kafka_controller_port=controller_port),
        )
        stack = LocalStack(stack_settings)
        stack.up()
        try:
            settings = ReplaySettings(kafka=KafkaSettings(bootstrap_servers=stack.bootstrap_servers()))
            ensure_topics(settings)
            frame = movielens.load_interactions()
            payloads = [(event.key(), event.to_bytes()) for event in interactions_from_frame(frame)]
            replay_rates, floor_rates = [], []
            for _ in tqdm(range(RUNS), desc="runs (replay + floor)"):
                report = replay(frame, settings, progress=False)
                if report.failed:
                    raise RuntimeError(f"replay run failed: {report.summary()}")
                replay_rates.append(report.events_per_s)
                floor_rates.append(floor_run(settings, payloads))
        finally:
            stack.down()
    replay_median = statistics.median(replay_rates)
    floor_median = statistics.median(floor_rates)
    ratio = replay_median / floor_median
    met = replay_median >= 50_000 and ratio >= 0.5
    write_result(
        "replay",
        {
            "replay.events_per_s": round(replay_median),
            "replay.floor_events_per_s": round(floor_median),
            "replay.ratio_to_floor": round(ratio, 3),
        },
        {"replay.events_per_s": "events/s", "replay.floor_events_per_s": "events/s", "replay.ratio_to_floor": ""},
        targets={"replay.events_per_s": ">= 50,000", "replay.ratio_to_floor": ">= 0.5"},
        command="make bench  # python -m bench.replay_throughput",
        notes=(
            f"Median of {RUNS} runs of all 100,000 MovieLens-100K events, broker and producer co-located "
            f"(single-node KRaft Kafka 3.9.1, 512 MiB heap, 4 partitions, acks=all, idempotence, lz4, linger 20 ms). "
            f"Replay runs: {[round(r) for r in replay_rates]}; floor runs: {[round(r) for r in floor_rates]}. "
            f"Targets {'met' if met else 'MISSED'}."
        ),
    )
    print(f"replay {replay_median:,.0f} ev/s, floor {floor_median:,.0f} ev/s, ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
