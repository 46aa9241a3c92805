"""The DTL over mutual TLS (as NBD: TLS 1.2+, node certificate and key, the cluster's CA)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from ovsfs.dtl import wire
from ovsfs.dtl.client import DtlClient, fetch_tail
from ovsfs.errors import DtlError
from tests.dtl.helpers import LocalLog, Peers, ThreadServer, blob, cfg, make_certs, pos, wait_for


def test_tls_round_trip_and_client_certificate_required(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    sctx = wire.server_ssl_context(certs["server_cert"], certs["server_key"], certs["ca"])
    cctx = wire.client_ssl_context(certs["client_cert"], certs["client_key"], certs["ca"])
    s = ThreadServer(tmp_path / "dtl", ssl_ctx=sctx)
    local = LocalLog()
    c = DtlClient("vol", 1, "sync", cfg(), Peers(s.peer), local.tail, lambda st: None, tls=cctx)
    local.sink = c
    try:
        wait_for(lambda: c.status()["state"] == "ok", what="in sync over TLS")
        for i in range(50):
            c.wait(local.write(pos(i), blob(i)))
        c.flush()
        assert fetch_tail(s.peer, "vol", 1, tls=cctx) == local.entries
        # Plain TCP to a TLS server: no answer that parses.
        with pytest.raises(DtlError):
            fetch_tail(s.peer, "vol", 1, timeout=2)
        # TLS without a client certificate: the handshake (or the first read) fails.
        anon = ssl.create_default_context(cafile=str(certs["ca"]))
        anon.check_hostname = False
        with pytest.raises(DtlError):
            fetch_tail(s.peer, "vol", 1, tls=anon, timeout=2)
        # A server this client's CA did not sign is refused by the client.
        (tmp_path / "other").mkdir()
        other = make_certs(tmp_path / "other")
        octx = wire.client_ssl_context(certs["client_cert"], certs["client_key"], other["ca"])
        with pytest.raises(DtlError):
            fetch_tail(s.peer, "vol", 1, tls=octx, timeout=2)
        assert c.status()["state"] == "ok"
    finally:
        c.close()
        s.stop()


def test_tls_contexts_from_the_config(tmp_path: Path) -> None:
    """A node uses one certificate both as DTL server and as client of its peers."""
    from ovsfs.config import Config, DtlSection
    from ovsfs.dtl.client import tls_from_config
    from ovsfs.dtl.server import DtlServer

    certs = make_certs(tmp_path)
    conf = Config(state_dir=tmp_path, dtl=DtlSection(
        tls="required", tls_cert="server.pem", tls_key="server.key", tls_ca="ca.pem"))
    assert tls_from_config(Config(state_dir=tmp_path)) is None
    sctx = DtlServer.from_config(conf).ssl_ctx
    assert sctx is not None and certs["server_cert"].exists()
    s = ThreadServer(tmp_path / "dtl", ssl_ctx=sctx)
    try:
        assert fetch_tail(s.peer, "vol", 0, tls=tls_from_config(conf)) == []
    finally:
        s.stop()
