"""ovsfs: distributed, software-defined block storage."""

__version__ = "0.1.0"
