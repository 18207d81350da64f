"""Timing, token and compute accounting."""
