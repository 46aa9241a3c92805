"""The FUSE door: one directory per vPool, one NAME.raw file per volume (see fs.py)."""
