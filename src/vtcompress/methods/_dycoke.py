"""Placeholder for the dycoke temporal method (merged into temporal.py when done)."""
