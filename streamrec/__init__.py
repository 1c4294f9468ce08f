"""streamrec: an event-driven streaming recommender.

This package holds the contracts every component shares (settings, event schemas, errors),
the data loaders, the Kafka replay producer and the local stack runner.
"""

__version__ = "0.1.0"
