"""Power-cut harness: a FUSE passthrough that keeps un-fsynced changes volatile (see lazyfs.py)."""
