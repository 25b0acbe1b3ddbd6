"""Placeholder for the holitom temporal method (merged into temporal.py when done)."""
