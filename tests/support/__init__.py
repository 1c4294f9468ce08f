"""Helpers shared by tests of several components (tiny models, fixtures that are not pytest's)."""
