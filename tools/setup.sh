#!/usr/bin/env bash
# Installs everything ovsfs needs on a Debian 12 machine (as root): Debian packages,
# a virtualenv in .venv/ with the package and its test tools. Safe to run again.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

debs=(python3 python3-venv python3-dev gcc pkg-config libfuse3-dev fuse3
      qemu-utils qemu-system-x86 nbdkit libnbd-bin python3-libnbd fio
      tgt libiscsi-bin etcd-server etcd-client busybox-static cpio curl rsync)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python (not a pyenv shim) so the venv matches python3-libnbd and the -dev headers.
py=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$py" -m venv .venv
fi
stamp=.venv/.ovsfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing ovsfs into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
