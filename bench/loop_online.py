"""The closed loop on real services: online hit rate against frozen and popularity, model freshness.

Runs ``make demo``'s loop (``streamrec.ops.demo.run``: Kafka, Redis, feature worker, model server,
bootstrap version 1 as stable, joiner, API, online trainer, evaluator, then the replay
simulator over the held-out part of ``--dataset``, default ml-100k), keeps the stack up at the
end to read the impressions topic back, then computes:

* **online hit rate@10**: the share of simulated visits whose real item was among the 10 items
  the live loop served (both arms; the replay method, so CTR = hit rate);
* **frozen hit rate@10**, same visits: the bootstrap version 1, never updated, asked with the
  very inputs the API logged in each impression (the user's Feast features at that moment,
  seen items excluded), through the same ``recommend`` signature. Visits the live loop
  answered with the trending fallback (model unavailable) keep that answer for frozen too;
* **popularity hit rate@10**, same visits: the 10 items with the most interactions so far
  (history plus the held-out events already replayed), the user's logged recent items excluded;
* **model freshness**: for each interaction the simulator produced (Kafka partition and offset,
  produce time), the first response served by a model version whose training data covers it
  (the trainer's lineage records the Kafka offsets below which each version learned every record,
  ``trained_offsets``: the rows it held out for its gate are learned by the next one; a version is
  fine-tuned from its predecessor, so later versions cover it too) minus the produce time.
  Interactions produced within the last ``2 x interval`` of the run cannot be covered before
  the end and are left out; any other interaction that no served version covered counts as
  infinitely stale, so it can only push the p95 up.

Run: ``.venv/bin/python -m bench.loop_online`` (about 11 minutes: 15,000 visits at 40/s, longer
than the demo so that the first minutes, before any trained version exists, weigh less).
``--visits 3000 --interval 30 --no-write`` is a smoke test; ``--analyze-only`` recomputes the
figures from the last run's files (pass the same ``--dataset``). Another dataset writes
``bench/results/loop-<dataset name>.json`` unless ``--result-name`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

from bench.common import report
from serving.rollout.decision_log import applied_decisions
from streamrec.core.settings import PROJECT_ROOT

K = 10


def read_impressions(settings: Any) -> pd.DataFrame:
    """Every impression the API logged: request id, arm, version, items, the features it used."""
    from streamrec.core.events import Impression
    from streamrec.kafka.consume import consume_decoded, end_offsets

    topic = settings.topics.impressions
    total = sum(end_offsets(settings, topic).values())
    rows = []
    for record in tqdm(
        consume_decoded(
            settings, topic, Impression, group_id=f"bench-{uuid.uuid4().hex[:8]}", max_records=total, idle_timeout_s=15
        ),
        total=total,
        desc="impressions",
        unit="rec",
    ):
        if record.event is None:
            continue
        event = record.event
        rows.append(
            {
                "request_id": event.request_id,
                "fallback": event.fallback,
                "degraded": event.degraded,
                "model_version": event.model_version,
                "items": [item.item_id for item in event.items],
                "interleaved": event.control_version is not None,
                "control_version": event.control_version if event.control_version is not None else -1,
                "features": json.dumps(event.features),
            }
        )
    return pd.DataFrame(rows)


def frozen_answers(version_dir: Path, visits: pd.DataFrame) -> list[list[str]]:
    """Top-K of the version in ``version_dir`` (the frozen one unless told) for each visit, from the
    features the API logged.

    The inputs are the version's own (``user_model_inputs`` of the schema in its
    ``assets.extra``), rebuilt the way the API builds them (``serving.api.ranking.model_inputs``),
    so a rescored visit gets exactly the request the live loop sent.
    """
    import tensorflow as tf

    from online_trainer.export import EXTRA_DIR
    from serving.api.ranking import model_inputs
    from serving.api.user_features import UserFeatures, normalized
    from streamrec.core import contracts
    from streamrec.core.attributes import read_schema, user_model_inputs

    kinds = user_model_inputs(read_schema(version_dir / EXTRA_DIR))
    signature = tf.saved_model.load(str(version_dir)).signatures[contracts.RECOMMEND_SIGNATURE]
    answers: list[list[str]] = []
    rows = visits.itertuples(index=False)
    for visit in tqdm(rows, total=len(visits), desc=f"version {version_dir.name}", unit="visit"):
        if visit.degraded and visit.model_version == 0:  # trending fallback: no model was asked
            answers.append(list(visit.items))
            continue
        raw = visit.features
        values = {name: normalized(kind, raw.get(name)) for name, kind in kinds.items() if name != "user_id"}
        features = UserFeatures.from_inputs(str(visit.user_id), values, kinds)
        inputs = model_inputs(features, list(features.recent_items), kinds)
        outputs = signature(**{name: tf.constant(value) for name, value in inputs.items()})
        excluded = set(features.recent_items)
        ranked = [item.decode() for item in outputs["item_ids"].numpy().reshape(-1)]
        scores = outputs["scores"].numpy().reshape(-1)
        answers.append(
            [
                item
                for item, score in zip(ranked, scores, strict=False)
                if item and item not in excluded and score > -np.inf
            ][:K]
        )
    return answers


def popularity_answers(history: pd.DataFrame, visits: pd.DataFrame) -> list[list[str]]:
    """Top-K by interactions so far (history + earlier visits), the logged recent items excluded."""
    counts: dict[str, int] = history["item_id"].astype(str).value_counts().to_dict()
    answers: list[list[str]] = []
    for visit in visits.itertuples(index=False):
        excluded = {str(item) for item in (visit.features.get("recent_items") or [])}
        ranked = sorted(counts.items(), key=lambda pair: -pair[1])
        answers.append([item for item, _ in ranked if item not in excluded][:K])
        counts[str(visit.item_id)] = counts.get(str(visit.item_id), 0) + 1
    return answers


def model_freshness(produced: pd.DataFrame, responses: pd.DataFrame, base_path: Path, cutoff: float) -> np.ndarray:
    """Seconds from produce to the first response by a version trained on it (inf: never)."""
    from online_trainer.export import read_lineage

    coverage: list[tuple[int, dict[int, int]]] = []
    for child in sorted(base_path.iterdir(), key=lambda path: int(path.name) if path.name.isdigit() else -1):
        if not child.name.isdigit():
            continue
        kafka = read_lineage(child).get("kafka") or {}  # None for the bootstrap
        # trained_offsets: what the version learned (the gate's held-out newest rows come one
        # version later); lineages from before it was recorded only have the consumed offsets
        offsets = kafka.get("trained_offsets") or kafka.get("offsets") or {}
        if offsets:
            coverage.append((int(child.name), {int(p): int(o) for p, o in offsets.items()}))
    first_served = responses.groupby("model_version")["time"].min().to_dict()
    # Versions are fine-tuned in order, so a version's successors cover whatever it covers.
    later_first = np.inf
    served_from: list[tuple[dict[int, int], float]] = []
    for version, offsets in reversed(coverage):
        later_first = min(later_first, first_served.get(version, np.inf))
        served_from.append((offsets, later_first))
    served_from.reverse()
    delays = []
    for row in produced[produced["produced_at"] <= cutoff].itertuples(index=False):
        served = next(
            (first for offsets, first in served_from if offsets.get(int(row.partition), 0) > int(row.offset)), np.inf
        )
        delays.append(served - row.produced_at)
    return np.asarray(delays, dtype=float)


def stable_version_age(visits: pd.DataFrame) -> np.ndarray:
    """Seconds since stable's version first answered a request, at each request stable took part in
    (its whole list, or the control half of an interleaved one); NaN where it did not.

    The line's newest version is about one trainer interval old when it serves; stable is as old as
    the last promotion, and ``bench/prequential.py --serve-lag`` measures what that age costs.
    """
    if "control_version" not in visits:  # impressions read before the column existed
        return np.full(len(visits), np.nan)
    first_served = visits.groupby("model_version")["time"].min()
    control = visits["control_version"].fillna(-1).astype(int).to_numpy()
    plain_stable = (visits["arm"] == "stable").to_numpy() & (control < 0)
    stable = np.where(control >= 0, control, np.where(plain_stable, visits["model_version"].to_numpy(), -1))
    born = pd.Series(stable).map(first_served).to_numpy(dtype=float)
    return np.asarray(visits["time"].to_numpy(dtype=float) - born, dtype=float)


def ratio_interval_over_users(
    user_ids: np.ndarray, online_hits: np.ndarray, frozen_hits: np.ndarray, *, resamples: int = 2000
) -> tuple[float, float]:
    """95 % interval of online/frozen hit rate, resampling users (with all their visits), not visits.

    A user's visits are clustered (the same tastes, often the same features), as the evaluator
    already assumes; resampling single visits would treat them as independent and give an
    interval that is too narrow. Both policies were scored on the same visits, so the resample is
    paired: the ratio of the drawn users' online hits to their frozen hits (a percentile interval).
    """
    users, user_index = np.unique(user_ids, return_inverse=True)
    online_per_user = np.bincount(user_index, weights=online_hits.astype(float), minlength=len(users))
    frozen_per_user = np.bincount(user_index, weights=frozen_hits.astype(float), minlength=len(users))

    def ratio(online: np.ndarray, frozen: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(online, axis=axis) / np.maximum(np.sum(frozen, axis=axis), 1e-9)

    result = stats.bootstrap(
        (online_per_user, frozen_per_user),
        ratio,
        paired=True,
        vectorized=True,
        n_resamples=resamples,
        confidence_level=0.95,
        method="percentile",
        random_state=np.random.default_rng(0),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--visits", type=int, default=15000, help="held-out visits (the demo runs 7,200)")
    parser.add_argument("--rate", type=float, default=40.0, help="visits per second (the demo runs 30)")
    parser.add_argument("--history-fraction", type=float, default=0.5)
    parser.add_argument("--interval", type=float, default=40.0, help="trainer interval, s")
    parser.add_argument("--label-window", type=float, default=10.0, help="joiner label window, s")
    parser.add_argument(
        "--canary-share",
        type=float,
        default=None,
        help="share of users in the canary arm (default: the demo's, streamrec.ops.demo.DemoOptions)",
    )
    parser.add_argument(
        "--ranking",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="two-stage serving (the demo's default); --no-ranking serves the retrieval order",
    )
    parser.add_argument(
        "--exploration", default="epsilon_greedy", help="exploration policy (the demo's default); none turns it off"
    )
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write results")
    parser.add_argument(
        "--result-name",
        default=None,
        help="bench/results/<name>.json (default: loop[-<dataset>]; e.g. loop_long for a --visits 40000 run)",
    )
    parser.add_argument(
        "--analyze-only", action="store_true", help="recompute the figures from the last run's files (no new run)"
    )
    args = parser.parse_args()

    from streamrec.core.settings import load
    from streamrec.datasets.description import load_dataset
    from streamrec.ops import demo
    from streamrec.ops.settings import SimulatorSettings, StackSettings
    from streamrec.ops.stack.local_stack import LocalStack

    canary_share = demo.DemoOptions().canary_share if args.canary_share is None else args.canary_share
    dataset = load_dataset(args.dataset)
    result_name = args.result_name or ("loop" if dataset.name == "ml-100k" else f"loop-{dataset.name}")

    state_dir = PROJECT_ROOT / ".state" / "bench-loop"
    impressions_path = state_dir / "impressions.parquet"
    if not args.analyze_only:
        # Keep every version on disk: the frozen version 1 is rescored and every lineage is read.
        os.environ["STREAMREC_TRAINER__RETENTION"] = "100000"
        options = demo.DemoOptions(
            dataset=args.dataset,
            history_fraction=args.history_fraction,
            visits=args.visits,
            rate=args.rate,
            trainer_interval_s=args.interval,
            label_window_s=args.label_window,
            canary_share=canary_share,
            state_dir=state_dir,
            keep_running=True,
            ranking=args.ranking,
            exploration=args.exploration,
        )
        try:
            demo.run(options)
            read_impressions(load(SimulatorSettings)).to_parquet(impressions_path)
        finally:
            LocalStack(load(StackSettings)).down()
    os.environ["STREAMREC_PATHS__STATE_DIR"] = str(state_dir)

    from online_trainer.settings import TrainerSettings

    simulator = load(SimulatorSettings)
    base_path = load(TrainerSettings).model_base_path
    impressions = pd.read_parquet(impressions_path)
    impressions["features"] = impressions["features"].map(json.loads)
    responses = pd.read_parquet(simulator.simulator_dir / "responses.parquet")
    produced = pd.read_parquet(simulator.simulator_dir / "interactions.parquet")
    visits = responses.merge(
        impressions.drop(columns=["fallback", "degraded", "model_version"]), on="request_id", how="left"
    )
    missing = int(visits["features"].isna().sum())
    if missing:
        print(f"{missing} responses have no logged impression; they are left out", file=sys.stderr)
        visits = visits[visits["features"].notna()].reset_index(drop=True)
    interactions = dataset.interactions
    history = interactions.head(int(len(interactions) * args.history_fraction))
    truth = visits["item_id"].astype(str).to_numpy()

    def hit_rate(answers: list[list[str]]) -> float:
        return float(np.mean([item in answer for item, answer in zip(truth, answers, strict=True)]))

    online_hits = visits["hit"].astype(bool).to_numpy()
    frozen = frozen_answers(base_path / "1", visits)
    frozen_hits = np.asarray([item in answer for item, answer in zip(truth, frozen, strict=True)])
    ctr_popularity = hit_rate(popularity_answers(history, visits))
    # Requests answered by a trainer-published version, and that version's own top 10 for each:
    # the live list, or for an interleaved one (half stable's) the version rescored on the same inputs.
    interleaved = visits["interleaved"].fillna(False).astype(bool).to_numpy()
    trained = (visits["model_version"] > 1).to_numpy()
    trained_hits = online_hits.copy()
    for version in sorted(set(visits.loc[trained & interleaved, "model_version"])):
        rows = np.flatnonzero(trained & interleaved & (visits["model_version"] == version).to_numpy())
        own = frozen_answers(base_path / str(version), visits.iloc[rows])
        trained_hits[rows] = [item in answer for item, answer in zip(truth[rows], own, strict=True)]
    # Self-check of the rescoring: where the live loop served version 1 itself, frozen must agree.
    served_v1 = (visits["model_version"] == 1).to_numpy()
    agreement = float(
        np.mean(
            [list(live) == answer for live, answer, v1 in zip(visits["items"], frozen, served_v1, strict=True) if v1]
        )
    )
    ratio_ci = ratio_interval_over_users(visits["user_id"].astype(str).to_numpy(), online_hits, frozen_hits)

    end = float(responses["time"].max())
    cutoff = end - 2 * args.interval
    delays = model_freshness(produced, responses, base_path, cutoff)
    decisions_path = state_dir / "evaluator" / "decisions.jsonl"
    decisions = applied_decisions(decisions_path)
    versions = sorted(int(child.name) for child in base_path.iterdir() if child.name.isdigit())

    stable_age = stable_version_age(visits)
    metrics = {
        "loop.ctr_popularity": round(ctr_popularity, 4),
        "loop.ctr_frozen": round(float(frozen_hits.mean()), 4),
        "loop.ctr_online": round(float(online_hits.mean()), 4),
        "loop.online_over_frozen": round(float(online_hits.mean() / max(frozen_hits.mean(), 1e-9)), 3),
        "loop.online_over_frozen_ci95_low": round(ratio_ci[0], 3),
        "loop.online_over_frozen_ci95_high": round(ratio_ci[1], 3),
        "loop.ctr_trained_versions": round(float(trained_hits[trained].mean()), 4) if trained.any() else 0.0,
        "loop.ctr_frozen_same_requests": round(float(frozen_hits[trained].mean()), 4) if trained.any() else 0.0,
        "loop.ctr_interleaved": round(float(online_hits[interleaved].mean()), 4) if interleaved.any() else 0.0,
        "loop.frozen_rescoring_agreement": round(agreement, 4),
        "loop.model_freshness_p50_s": round(float(np.percentile(delays, 50)), 1),
        "loop.model_freshness_p95_s": round(float(np.percentile(delays, 95)), 1),
        "loop.model_freshness_within_120s": round(float(np.mean(delays <= 120)), 4),
    }
    if np.isfinite(stable_age).any():
        metrics["loop.stable_version_age_mean_s"] = round(float(np.nanmean(stable_age)), 1)
    # the off-policy gate's estimates vs the realized rates, as the demo's report computed them
    summary = json.loads((state_dir / "report" / "summary.json").read_text())
    for key in ("ope_versions_estimated", "ope_versions_with_realized_ctr", "ope_estimate_mean_abs_error"):
        if key in summary:
            metrics[f"loop.{key}"] = summary[key]
    units = {
        "loop.ctr_popularity": "hit rate@10",
        "loop.ctr_frozen": "hit rate@10",
        "loop.ctr_online": "hit rate@10",
        "loop.online_over_frozen": "ratio",
        "loop.online_over_frozen_ci95_low": "ratio",
        "loop.online_over_frozen_ci95_high": "ratio",
        "loop.ctr_trained_versions": "hit rate@10",
        "loop.ctr_frozen_same_requests": "hit rate@10",
        "loop.ctr_interleaved": "hit rate@10",
        "loop.frozen_rescoring_agreement": "fraction",
        "loop.model_freshness_p50_s": "s",
        "loop.model_freshness_p95_s": "s",
        "loop.model_freshness_within_120s": "fraction",
        "loop.stable_version_age_mean_s": "s",
        "loop.ope_versions_estimated": "versions",
        "loop.ope_versions_with_realized_ctr": "versions",
        "loop.ope_estimate_mean_abs_error": "click rate",
    }
    by_arm = visits.groupby("arm")["hit"].agg(["mean", "size"])
    arms = ", ".join(f"{arm} {row['mean']:.4f} over {int(row['size']):,}" for arm, row in by_arm.iterrows())
    actions = [f"{d['action']} v{d['canary_version']} ({d['reason']})" for d in decisions]
    notes = (
        f"`streamrec demo` loop: history {args.history_fraction:.0%} of {dataset.name}, then {len(visits):,} "
        f"held-out visits at {args.rate:g}/s, canary share {canary_share:g}, trainer interval {args.interval:g} s, "
        f"label window {args.label_window:g} s; stable bootstrapped on the first "
        f"{demo.DemoOptions().bootstrap_share:.0%} of the history; "
        f"ranking stage {'on' if args.ranking else 'off'}, exploration "
        f"{args.exploration} (the demo's epsilon and slots); all services real and on this machine. Same visits "
        f"for every policy: online = what the live loop served (per arm: {arms}); frozen = version 1 rescored on the "
        f"features each impression logged; popularity = most interacted items so far. Online/frozen 95% bootstrap "
        f"interval over users (a user's visits resampled together) {ratio_ci[0]:.3f}-{ratio_ci[1]:.3f}. "
        "ctr_trained_versions / ctr_frozen_same_requests: the "
        f"{int(trained.sum()):,} requests answered by a trainer-published version, scored by that version's own "
        "top 10 (the live list, or rescored on the logged inputs where the user saw it interleaved with stable), "
        f"and frozen on those same requests; ctr_interleaved: the {int(interleaved.sum()):,} canary requests shown "
        "the team-draft interleaving of canary and stable. frozen_rescoring_agreement: share of the requests the "
        "live loop answered with version 1 where the rescored top 10 equals the live one (a check of the rescoring). "
        f"Versions on disk: {versions}; decisions: {actions or 'none'}. Model freshness over {len(delays):,} "
        f"interactions produced before the last {2 * args.interval:g} s (Kafka produce -> first response by a "
        f"version whose lineage offsets cover it; never covered = inf: {int(np.isinf(delays).sum())}). "
        "stable_version_age_mean_s: seconds since stable's version first answered a request, averaged over the "
        "requests it answered alone or as the interleaving's control (the line's newest version is about one "
        "trainer interval old)."
    )
    defaults = parser.parse_args([])
    flags = ("visits", "rate", "interval", "history_fraction")
    changed = [f"--dataset {args.dataset}"] if args.dataset != defaults.dataset else []
    changed += [f"--{name.replace('_', '-')} {getattr(args, name):g}" for name in flags
                if getattr(args, name) != getattr(defaults, name)]  # fmt: skip
    changed += [f"--canary-share {args.canary_share:g}"] if args.canary_share is not None else []
    changed += [] if args.ranking else ["--no-ranking"]
    changed += [f"--exploration {args.exploration}"] if args.exploration != defaults.exploration else []
    changed += [f"--result-name {args.result_name}"] if args.result_name is not None else []
    report(
        result_name,
        metrics,
        units,
        targets={
            "loop.online_over_frozen": ">= 1.2",
            "loop.model_freshness_p95_s": "<= 30 s",
        },
        command=" ".join(["python -m bench.loop_online", *changed]),
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
