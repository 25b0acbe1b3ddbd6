"""Placeholder for the fastvid temporal method (merged into temporal.py when done)."""
