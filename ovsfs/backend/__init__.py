"""Backends: where sealed SCOs, TLogs and volume metadata live."""
