"""Reusable Tune search spaces, imported by experiment files."""
