"""Errors raised by streamrec, each naming what to do about it.

StreamrecError
├── SettingsError           a setting is unknown or invalid (fix the env var / config key)
├── EventValidationError    an event cannot be decoded or breaks its schema (dead-letter it)
├── DatasetError            a dataset is missing or malformed (install or fix the file)
└── StackError              a local service failed to start or answer (see its log)
"""


class StreamrecError(Exception):
    """Base of every error streamrec raises on purpose."""


class SettingsError(StreamrecError):
    """A setting is unknown or has an invalid value; the message names it."""


class EventValidationError(StreamrecError):
    """An event could not be decoded or validated.

    ``reason`` is a short machine-readable kind (``undecodable``, ``schema``, ``event_time``) and
    the message is the human explanation; the dead-letter record carries both.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class DatasetError(StreamrecError):
    """A dataset file is missing or cannot be parsed; the message names the fix."""


class StackError(StreamrecError):
    """A local service did not start or stop as expected; the message names its log."""
