"""The `ovsfs` command line."""
