"""Running the real services locally: the Kafka broker, Redis and the process runner."""
