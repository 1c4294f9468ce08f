"""streamrec: an event-driven streaming recommender.

``streamrec.core`` holds what every component shares (contracts, events, errors, the settings base
and loader) and imports nothing else of the project; ``streamrec.kafka`` and ``streamrec.datasets``
are helpers the components share; ``streamrec.ops`` (the CLI, demo, simulator, replay, report and
local stack) sits on top and nothing imports it. See docs/architecture.md.
"""

__version__ = "0.1.0"
