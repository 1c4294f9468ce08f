"""How fast the loop acts on live feedback: a broken canary's rollback, a better canary's promotion.

On a fresh local stack (real Kafka + Redis on free ports) this runs the scripted-user loop of
``tests.support.ab_scenario``: the local model server, the API, the Faust joiner (a child
process) and the A/B evaluator with its **default** decision rule (``PolicyConfig()``, what
``streamrec evaluator`` runs). Users arrive at ``--rate`` visits/s; half are in the canary arm, and
see the API's default answer for it (the team-draft interleaving of canary and stable).
Each round:

1. a fresh stable version (CTR about 0.5 for the scripted users) is served on both labels;
2. a **broken** version (random item order, CTR about 0.1) is published as canary; the clock
   starts when ``publish_canary`` returns (the version loaded and the label moved) and stops
   when the evaluator has rolled it back (the canary label is back on stable);
3. a **better** version (CTR about 1) is published as canary; the clock runs until it is promoted.

Reported per decision kind, over the rounds: seconds from "canary serving" to the decision, and
the canary-arm impressions served in that time (what users saw of the canary before the
loop acted). The joiner's label window (``--label-window``) delays every click by that much
before the evaluator can count it, so it is part of the time to decide.

Run: ``.venv/bin/python -m bench.loop_decisions`` (about 3 minutes); ``--rounds 1 --no-write``
is a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from bench.common import report
from serving.rollout.decision_log import applied_decisions
from serving.rollout.policy import PolicyConfig
from streamrec.core import contracts
from streamrec.core.settings import (
    CommonSettings,
    TopicSettings,
)
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.stack.ports import stack_settings_on_free_ports
from tests.support.ab_scenario import Scenario, ab_scenario


def timed_decision(
    scenario: Scenario, version: int, *, decided: str, rate: float, timeout_s: float
) -> dict[str, float]:
    """Publish ``version`` as canary and run visits until the evaluator has ``decided`` on it."""
    scenario.admin.publish_canary(version)
    started = time.monotonic()
    visits_before = scenario.visits
    if decided == "rollback":
        done = lambda: scenario.admin.labels().get(contracts.CANARY_LABEL) != version  # noqa: E731
    else:
        done = lambda: scenario.admin.labels().get(contracts.STABLE_LABEL) == version  # noqa: E731
    scenario.run_until(done, timeout_s, visits_per_round=10, rate=rate)
    actions = scenario.decisions()
    if not actions or actions[-1] != decided:
        raise RuntimeError(f"expected a {decided} of version {version}, the evaluator's decisions are {actions}")
    return {
        "seconds": time.monotonic() - started,
        "canary_impressions": float(scenario.impressions.get((contracts.CANARY_LABEL, version), 0)),
        "visits": float(scenario.visits - visits_before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rollback + promotion cycles")
    parser.add_argument("--rate", type=float, default=30.0, help="visits per second (the demo's rate)")
    parser.add_argument("--label-window", type=float, default=10.0, help="joiner label window, s (the demo's)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per decision")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write results")
    args = parser.parse_args()

    from streamrec.ops.stack.local_stack import LocalStack

    results: dict[str, list[dict[str, float]]] = {"rollback": [], "promote": []}
    policy = PolicyConfig()
    with ExitStack() as cleanup:
        state = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-decisions-")))
        stack_settings = stack_settings_on_free_ports(state / "stack")
        stack = LocalStack(stack_settings)
        print("starting Kafka and Redis ...", file=sys.stderr)
        stack.up()
        cleanup.callback(stack.down)
        settings = CommonSettings(
            kafka=stack_settings.kafka,
            redis=stack_settings.redis,
            paths=stack_settings.paths,
            topics=TopicSettings.prefixed(f"b{uuid.uuid4().hex[:8]}"),
        )
        ensure_topics(settings)
        scenario = cleanup.enter_context(
            ab_scenario(settings, state / "loop", policy=policy, label_window_s=args.label_window)
        )
        for round_index in tqdm(range(args.rounds), desc="decision rounds", unit="round"):
            stable, broken, better = 3 * round_index + 2, 3 * round_index + 3, 3 * round_index + 4
            scenario.write_version(stable, "baseline")
            scenario.write_version(broken, "broken", seed=round_index)
            scenario.write_version(better, "better")
            scenario.admin.publish_stable(stable)
            results["rollback"].append(
                timed_decision(scenario, broken, decided="rollback", rate=args.rate, timeout_s=args.timeout)
            )
            results["promote"].append(
                timed_decision(scenario, better, decided="promote", rate=args.rate, timeout_s=args.timeout)
            )
        failures = list(scenario.failures)
        decisions_path = scenario.evaluator_dir / "decisions.jsonl"
        reasons = [record["reason"] for record in applied_decisions(decisions_path)]

    metrics: dict[str, float] = {}
    units: dict[str, str] = {}
    for kind, runs in results.items():
        metrics[f"loop.{kind}_impressions_median"] = statistics.median(r["canary_impressions"] for r in runs)
        metrics[f"loop.{kind}_impressions_max"] = max(r["canary_impressions"] for r in runs)
        metrics[f"loop.{kind}_s_median"] = round(statistics.median(r["seconds"] for r in runs), 1)
        metrics[f"loop.{kind}_s_max"] = round(max(r["seconds"] for r in runs), 1)
        units |= {
            f"loop.{kind}_impressions_median": "canary impressions",
            f"loop.{kind}_impressions_max": "canary impressions",
            f"loop.{kind}_s_median": "s",
            f"loop.{kind}_s_max": "s",
        }
    metrics["loop.decision_failed_requests"] = float(len(failures))
    units["loop.decision_failed_requests"] = "requests"
    per_run = "; ".join(
        f"{kind} " + ", ".join(f"{r['seconds']:.0f} s/{r['canary_impressions']:.0f} imp" for r in runs)
        for kind, runs in results.items()
    )
    notes = (
        f"{args.rounds} rounds of scripted users (tests/support/ab_scenario.py): stable CTR ~0.5, broken canary "
        f"(random item order) CTR ~0.1, better canary CTR ~1; {args.rate:g} visits/s, canary share 0.5, joiner label "
        f"window {args.label_window:g} s, API default (canary users see the team-draft interleaving of canary and "
        f"stable), evaluator default rule (on the canary's share of clicked interleaved requests: mSPRT alpha "
        f"{policy.alpha}, tau {policy.interleave_tau}, from {policy.interleave_min_credits} clicked requests; "
        "guardrails as in serving/rollout/policy.py). Clock: canary label on the new version -> the evaluator's label "
        f"move. Per run: {per_run}. Decision reasons: {' | '.join(reasons)}. "
        f"Failed Recommend calls during all rounds: {len(failures)}. "
        "Real Kafka, Redis, model server, API and Faust joiner on this machine; tiny model (60 items)."
    )
    report(
        "loop_decisions",
        metrics,
        units,
        targets={"loop.decision_failed_requests": "<= 0 requests"},
        command="python -m bench.loop_decisions",
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
