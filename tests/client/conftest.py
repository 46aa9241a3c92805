"""The client library's tests run against qemu-storage-daemon's vhost-user-blk export
(tests/qsd.py) and against the daemon (tests/conftest.py)."""

from tests.qsd import StorageDaemon, qsd, qsd_factory  # noqa: F401 - fixtures for tests/client
