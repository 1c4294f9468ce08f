"""Experiment arms: which model label (``stable`` or ``canary``) serves a user.

A user's arm is a pure function of ``(salt, user_id)``: the first 8 bytes of
``sha256(salt ":" user_id)`` as an integer, divided by 2**64, gives a point in [0, 1) that is
uniform over users and independent of the user id's shape; points below ``canary_share`` are in
the canary arm. So a user stays in one arm for the whole experiment, on every API replica,
without any shared state, and a new salt draws a fresh, independent split.

The API serves a canary user from stable while the model server has no ``canary`` label (no
experiment running); :class:`CanaryGate` remembers that for a short while so those users do not
pay for a failed call each time.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from streamrec.core import contracts
from streamrec.core.events import Arm

_SCALE = float(2**64)


def bucket(salt: str, user_id: str) -> float:
    """The user's point in [0, 1) for this salt."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def assign_arm(salt: str, user_id: str, canary_share: float) -> Arm:
    return contracts.CANARY_LABEL if bucket(salt, user_id) < canary_share else contracts.STABLE_LABEL


class CanaryGate:
    """Remembers, for ``recheck_s``, that the model server has no canary label."""

    def __init__(self, recheck_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._recheck_s = recheck_s
        self._clock = clock
        self._missing_until = 0.0
        self._lock = threading.Lock()

    def canary_available(self) -> bool:
        return self._clock() >= self._missing_until

    def mark_missing(self) -> None:
        with self._lock:
            self._missing_until = self._clock() + self._recheck_s
