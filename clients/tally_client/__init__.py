"""Tally's Python client, metadata helper and command line."""
