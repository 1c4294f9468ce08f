"""The ops layer: the ``streamrec`` CLI, demo, simulator, replay producer, report and local stack.

It may import every component; nothing imports it (an import-linter contract checks it).
"""
