"""Kafka helpers the components and the ops layer share: topic creation and reading events back."""
