#!/usr/bin/env bash
# Set up (if needed) and run the embedded single-node daemon on ./var: local backend,
# NBD export at ./var/run/nbd.sock, FUSE mount at ./var/mnt, management API at
# ./var/run/ovsfs.sock. Stop it with ^C (SIGINT) or SIGTERM.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash tools/setup.sh
exec .venv/bin/ovsfs run --state ./var
