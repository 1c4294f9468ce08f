"""The local stack: Kafka and Redis from real releases and the project processes, under supervisord."""
