"""Time from a model version directory appearing to the first response it serves; server RSS.

A ``streamrec model-server`` process (the same command line the stack runs) serves a base path
with the default ``latest`` policy while one client streams ``recommend`` Predicts (latest
version, a few hundred per second). Each swap renames a complete version directory into the
base path (as the trainer does) and measures until the first response whose ``model_spec``
names the new version: poll wait + load + warm-up + the first request. Failed requests during
the swaps are counted (they must be 0). The server's RSS is sampled throughout; the peak is
reported.

The model is the tests' tiny model with a catalog of ``--catalog-size`` items, or any SavedModel
directory given with ``--model-dir`` (e.g. one the trainer exported), copied for every version.

Run: ``.venv/bin/python -m bench.model_swap`` (``--swaps 3 --no-write`` for a quick check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from bench.common import write_result
from serving.model_client import ModelServerClient, ModelServerRpcError
from streamrec.core import contracts
from streamrec.ops.stack.ports import free_ports
from tests.support.tiny_model import example_inputs, write_tiny_model


class Stream:
    """Predicts in a loop; records (time, version) answers, failures and the server's peak RSS."""

    def __init__(self, client: ModelServerClient, server_pid: int) -> None:
        self.client = client
        self.process = psutil.Process(server_pid)
        self.answers: list[tuple[float, int]] = []
        self.failures: list[str] = []
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        inputs = example_inputs(["bench-user"], recent_items=[[]])
        next_sample = 0.0
        while not self._stop.is_set():
            try:
                version, _ = self.client.predict(inputs, timeout_s=5.0)
                self.answers.append((time.monotonic(), version))
            except ModelServerRpcError as exc:
                self.failures.append(str(exc))
            now = time.monotonic()
            if now >= next_sample:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                next_sample = now + 0.1
            time.sleep(0.002)

    def wait_for(self, version: int, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            answers = self.answers
            for at, served in answers[seen:]:
                if served == version:
                    return at
            seen = max(0, len(answers) - 1)
            time.sleep(0.005)
        raise RuntimeError(f"version {version} was not served within {timeout_s} s; failures: {self.failures[:3]}")


def stage_version(template: Path, base: Path, version: int) -> None:
    staging = base / f".tmp-{version}"
    shutil.copytree(template, staging)
    os.rename(staging, base / str(version))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--pause-s", type=float, default=2.0, help="between swaps")
    parser.add_argument("--poll-s", type=float, default=1.0, help="--file_system_poll_wait_seconds")
    parser.add_argument("--catalog-size", type=int, default=1682, help="items in the tiny model (ml-100k: 1682)")
    parser.add_argument("--model-dir", type=Path, help="a SavedModel to serve instead of the tiny model")
    parser.add_argument("--no-write", action="store_true", help="print the figures, write no result file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as work:
        root = Path(work)
        base = root / contracts.MODEL_NAME
        base.mkdir()
        if args.model_dir is not None:
            template = args.model_dir
        else:
            items = [str(k) for k in range(1, args.catalog_size + 1)]
            template = write_tiny_model(root / "template", 1, item_ids=items)
        stage_version(template, base, 1)
        (port,) = free_ports(1)
        command = [
            sys.executable, "-m", "serving.model_server.cli", "--port", str(port),
            "--model_name", contracts.MODEL_NAME, "--model_base_path", str(base),
            "--file_system_poll_wait_seconds", str(args.poll_s),
        ]  # fmt: skip
        log_path = root / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        client = ModelServerClient(f"127.0.0.1:{port}", contracts.MODEL_NAME, timeout_s=5.0)
        try:
            client.wait_until_available(1, timeout_s=120)
            delays: list[float] = []
            with Stream(client, server.pid) as stream:
                stream.wait_for(1, timeout_s=30)
                for version in tqdm(range(2, args.swaps + 2), desc="swaps", unit="swap"):
                    appeared = time.monotonic()
                    stage_version(template, base, version)
                    delays.append(stream.wait_for(version, timeout_s=args.poll_s + 120) - appeared)
                    time.sleep(args.pause_s)
            answered, failed, peak_rss = len(stream.answers), len(stream.failures), stream.peak_rss
        finally:
            client.close()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)

    p50 = statistics.median(delays)
    p95 = float(np.percentile(delays, 95))
    metrics = {
        "model.version_to_served_p50_s": round(p50, 3),
        "model.version_to_served_p95_s": round(p95, 3),
        "model.server_rss_mb": round(peak_rss / 2**20, 1),
    }
    units = {key: ("MB" if key.endswith("_mb") else "s") for key in metrics}
    notes = (
        f"{len(delays)} swaps, {args.pause_s} s apart, poll wait {args.poll_s} s, "
        f"model: {args.model_dir or f'tiny model, {args.catalog_size} items'}; "
        f"{answered} Predicts streamed during the swaps, {failed} failed. "
        "Delay = version dir renamed into the base path -> first response naming that version "
        "(poll wait + load + warm-up + one request). RSS = peak resident set of the server process."
    )
    print(metrics, notes, sep="\n")
    if failed:
        print(f"FAILED requests during swaps: {failed}; first: {stream.failures[:3]}", file=sys.stderr)
    if not args.no_write:
        write_result(
            "model_swap",
            metrics,
            units,
            targets={"model.version_to_served_p95_s": "<= 5 s"},
            command="python -m bench.model_swap " + " ".join(sys.argv[1:]),
            notes=notes,
        )


if __name__ == "__main__":
    main()
