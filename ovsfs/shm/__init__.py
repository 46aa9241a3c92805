"""The shared-memory door: a vhost-user-blk back end per volume for QEMU and the client
library (ovsfs.client). server.py is the entry point; see docs/SHM.md."""
