"""The client library ("Edge"): the vhost-user front end of the shm door, a block volume
over it (`VhostVolume`), `openvstorage:` URIs and a small NBD client for remote nodes.

Imports only `ovsfs.vhost`, `ovsfs.errors`, `ovsfs.config` and the standard library, so
that programs which are not the daemon can use it."""
