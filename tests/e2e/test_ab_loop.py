"""The feedback loop on real services: API -> impressions, users -> clicks, the Faust joiner ->
labeled examples, the evaluator -> promote / roll back through the model server's labels.

The scripted users of ``tests.support.ab_scenario`` make the outcome known: version 2 (random
weights) published as canary must be rolled back, version 3 (every liked item in its top 10)
must be promoted, and stable must keep serving throughout with zero failed requests. Canary
users see the API's default answer, the team-draft interleaving of canary and stable.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.rollout.policy import PolicyConfig
from streamrec.core.settings import CommonSettings
from tests.support.ab_scenario import ab_scenario


def test_bad_canary_is_rolled_back_and_better_canary_promoted(fresh_settings: CommonSettings, tmp_path: Path) -> None:
    with ab_scenario(fresh_settings, tmp_path, policy=PolicyConfig(min_trials=150)) as scenario:
        scenario.write_version(2, "broken")
        scenario.write_version(3, "better")
        scenario.admin.publish_canary(2)
        scenario.run_until(lambda: scenario.admin.labels().get("canary") == 1, timeout_s=150)
        assert scenario.evaluator.rejected_versions() == [2]
        scenario.admin.publish_canary(3)
        scenario.run_until(lambda: scenario.admin.labels().get("stable") == 3, timeout_s=150)
    assert scenario.decisions() == ["rollback", "promote"]
    # Canary users saw interleaved lists, so both verdicts came from the canary's share of clicks.
    records = (scenario.evaluator_dir / "decisions.jsonl").read_text().splitlines()
    assert all(json.loads(record)["figures"]["interleaving"]["clicked"] >= 30 for record in records)
    # Every click had kind "click", carried by the joiner: that segment is each arm's overall CTR.
    for figures in (json.loads(record)["figures"] for record in records):
        by_kind = figures["slices"]["segments"]["event_kind=click"]
        for arm in ("stable", "canary"):
            assert (by_kind[arm]["trials"], by_kind[arm]["clicks"]) == (figures[arm]["requests"], figures[arm]["hits"])
    assert scenario.failures == []
    served = scenario.served_versions
    assert ("stable", 1) in served and ("canary", 2) in served and ("canary", 3) in served
