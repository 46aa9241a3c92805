"""The ASD wire protocol: one framing shared by the server and the client.

A frame is a fixed 12-byte prefix (magic, JSON header length, payload length), a
small JSON header naming the operation and its arguments, then raw payload bytes.
The payload never goes through JSON, so fragments travel without copies or
base64; the header keeps the protocol easy to extend and to debug.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

REQUEST_MAGIC = b"OVA1"
REPLY_MAGIC = b"OVR1"
PREFIX = struct.Struct(">4sII")
MAX_HEADER = 64 << 10
MAX_PAYLOAD = 256 << 20  # a fragment is at most a few MiB; a scan reply of manifests can be larger


class ProtocolError(Exception):
    """The peer sent something that is not a frame: the connection is unusable."""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("connection closed by peer")
        got += r
    return buf


def send_frame(sock: socket.socket, magic: bytes, header: dict[str, Any],
               payload: bytes | bytearray | memoryview = b"") -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = PREFIX.pack(magic, len(head), len(payload))
    if len(payload) < 64 << 10:
        sock.sendall(prefix + head + bytes(payload))
    else:
        # Large payloads go out from the caller's buffer: sendall releases the GIL
        # and we avoid concatenating megabytes.
        sock.sendall(prefix + head)
        sock.sendall(payload)


def recv_frame(sock: socket.socket, magic: bytes) -> tuple[dict[str, Any], bytearray]:
    raw = recv_exact(sock, PREFIX.size)
    got, hlen, plen = PREFIX.unpack(raw)
    if got != magic:
        raise ProtocolError(f"bad magic {bytes(got)!r}")
    if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
        raise ProtocolError(f"frame too large (header {hlen}, payload {plen})")
    try:
        header = json.loads(recv_exact(sock, hlen))
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"bad header: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not an object")
    payload = recv_exact(sock, plen) if plen else bytearray()
    return header, payload
