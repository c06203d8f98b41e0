"""Tally server: prices GenAI usage events and attributes them to experiences."""
