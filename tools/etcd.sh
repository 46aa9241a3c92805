#!/usr/bin/env bash
# Start or stop a 1- or 3-member etcd on 127.0.0.1: tools/etcd.sh start|stop DIR [MEMBERS] [BASEPORT]
top=$(cd "$(dirname "$0")/.." && pwd); py=${PYTHON:-$top/.venv/bin/python}
PYTHONPATH="$top${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m ovsfs.cluster.etcd_launch "$@"
