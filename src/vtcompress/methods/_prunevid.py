"""Placeholder for the prunevid temporal method (merged into temporal.py when done)."""
