#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# pytest exits 5 when it collects no tests: that, like any non-zero status, fails this script.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash tools/setup.sh

# The QEMU test guest (tests/guest, issue 12): Debian 12's kernel and a busybox-static
# initramfs, built once per machine under ${OVSFS_GUEST_CACHE:-/var/cache/ovsfs-guest}
# (about 5 s and a 70 MB download the first time; a file check when cached).
if ! .venv/bin/python -m tests.guest.image; then
  # A fresh machine may have no package lists yet: fetch them once and try again.
  if ! { apt-get update -qq && .venv/bin/python -m tests.guest.image; }; then
    echo "test: warning: the test guest could not be built; tests/guest will fail until it is" >&2
  fi
fi

exec .venv/bin/python -m pytest -p no:cacheprovider -ra tests "$@"
