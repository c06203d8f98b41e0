"""Tally's ingest benchmark: `make bench` (or `python -m bench --help`)."""
