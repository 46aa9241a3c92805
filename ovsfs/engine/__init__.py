"""The log-structured volume engine: one per node, serving every volume."""
