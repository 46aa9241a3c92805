"""Fixtures of the guest tests: the cached guest image, and qemu-storage-daemon exports
(`qsd_factory` from tests/qsd.py).

qemu-storage-daemon's vhost-user-blk export is the reference back end: the harness (image,
/init, boot helper, pattern checks) is validated against it before it judges ovsfs.
"""

from __future__ import annotations

import shutil

import pytest

from tests.guest.image import GuestImage, GuestImageError, ensure_image
from tests.qsd import qsd_factory  # noqa: F401 - a fixture of these tests


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The guest kernel + initramfs (built once per machine; tools/test.sh builds it before the tests)."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is not installed (tools/setup.sh installs qemu-system-x86)")
    try:
        return ensure_image()
    except GuestImageError as e:
        pytest.fail(f"cannot build the test guest: {e}")
