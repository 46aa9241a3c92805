"""Helpers every CLI command module shares: the client for the chosen node, sizes, output."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from ovsfs.cli.client import CliError, Client, socket_path, state_dir
from ovsfs.errors import OvsfsError
from ovsfs.mgmt.units import parse_size


def client_for(args: argparse.Namespace, timeout: float | None = None) -> Client:
    sock = args.socket or os.environ.get("OVSFS_SOCKET")
    return Client(Path(sock) if sock else socket_path(state_dir(args.state)), timeout)


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except OvsfsError as e:
        raise CliError(e.message) from None


def out(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        human(data)
