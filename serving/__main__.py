"""``python -m serving``: run the recommendation API (same as ``streamrec api serve``)."""

from serving.api.cli import main

main()
