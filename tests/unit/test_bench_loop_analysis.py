"""The loop benchmark's stable-age figure: which version stood for stable in each request, and since when."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.loop_online import stable_version_age


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
