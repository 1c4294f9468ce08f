"""What every component shares: contracts, events, errors, the settings base and loader.

Imports nothing else of the project (an import-linter contract in pyproject.toml checks it).
"""
