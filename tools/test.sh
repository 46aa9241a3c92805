#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# pytest exits 5 when it collects no tests: that, like any non-zero status, fails this script.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bash tools/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -ra tests "$@"
