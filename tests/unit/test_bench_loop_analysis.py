"""The loop benchmark's analysis: the stable-age figure (which version stood for stable in each request, and
since when) and the online/frozen interval over users."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.loop_online import ratio_interval_over_users, stable_version_age


def test_stable_age_counts_from_the_versions_first_answer_alone_or_as_the_interleavings_control() -> None:
    visits = pd.DataFrame(
        {
            "time": [0.0, 5.0, 12.0, 20.0, 30.0, 31.0],
            "arm": ["stable", "canary", "canary", "stable", "canary", "stable"],
            "model_version": [1, 2, 3, 1, 4, 2],
            # -1: a plain list; otherwise the version whose picks were interleaved with the canary's
            "control_version": [-1, 1, 1, -1, 2, -1],
        }
    )
    ages = stable_version_age(visits)
    # v1 first answered at 0; v2 first answered (as canary) at 5 and is stable's by t=30
    np.testing.assert_allclose(ages, [0.0, 5.0, 12.0, 20.0, 25.0, 26.0])


def test_a_canary_list_shown_alone_has_no_stable_age_and_old_impressions_give_none() -> None:
    visits = pd.DataFrame(
        {"time": [0.0, 1.0], "arm": ["stable", "canary"], "model_version": [1, 2], "control_version": [-1, -1]}
    )
    assert np.isnan(stable_version_age(visits)[1])
    assert np.isnan(stable_version_age(visits.drop(columns="control_version"))).all()


def test_the_ratio_interval_resamples_users_so_clustered_visits_widen_it() -> None:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(40), 50)  # 40 users, 50 visits each
    # Each user either always gains from the online model or never does: the visits are clustered.
    gains = np.repeat(rng.random(40) < 0.5, 50)
    frozen = rng.random(users.size) < 0.2
    online = frozen | (gains & (rng.random(users.size) < 0.3))
    low, high = ratio_interval_over_users(users.astype(str), online, frozen)
    ratio = online.mean() / frozen.mean()
    assert low < ratio < high
    # Resampling single visits, as if independent, gives a narrower interval.
    draws = rng.integers(0, users.size, size=(2000, users.size))
    by_visit = np.percentile(online[draws].mean(axis=1) / frozen[draws].mean(axis=1), [2.5, 97.5])
    assert high - low > 1.5 * (by_visit[1] - by_visit[0])


def test_the_ratio_interval_of_identical_policies_is_one() -> None:
    hits = np.array([True, False, True, True, False, False] * 10)
    users = np.arange(hits.size).astype(str)
    low, high = ratio_interval_over_users(users, hits, hits)
    assert low == high == 1.0
