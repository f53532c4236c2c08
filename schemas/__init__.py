"""Versioned record schemas of memstream: the Python dataclasses are the source of truth."""
