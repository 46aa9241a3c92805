"""Real NBD clients against the NBD door (in-process server over the real engine)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.doors.conftest import have, run

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not have("qemu-io"), reason="qemu-utils not installed")


def nbdsh(uri: str, code: str, **kw) -> subprocess.CompletedProcess:
    # Debian's python3-libnbd lives in the system python: keep the venv off PATH.
    return run(["nbdsh", "-u", uri, "-c", code], **kw)


def make_image(path: Path, size: int) -> bytes:
    """Random data with holes every other MiB."""
    data = bytearray(size)
    for off in range(0, size, 2 * MiB):
        data[off:off + MiB] = os.urandom(MiB)
    path.write_bytes(data)
    return bytes(data)


def test_qemu_io_patterns(nbd) -> None:
    u = nbd.uri("vol1")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 512 4k",
         "-c", "read -P 0xab 0 512", "-c", "read -P 0xcd 512 4k", "-c", "read -P 0 8M 1M",
         "-c", "write -z 0 4k", "-c", "read -P 0 0 4k", "-c", "discard 64k 64k",
         "-c", "read -P 0 64k 64k", "-c", "flush", u])
    out = run(["qemu-io", "-f", "raw", "-c", "read -P 0xab 128k 64k", u]).stdout
    assert "read 65536/65536" in out


def test_nbdinfo_list_and_flags(nbd) -> None:
    nbd.engine.create_volume("vol2", 8 * MiB)
    out = run(["nbdinfo", "--list", "--json", nbd.uri()]).stdout
    names = {e["export-name"] for e in json.loads(out)["exports"]}
    assert names == {"vol1", "vol2"}
    info = json.loads(run(["nbdinfo", "--json", nbd.uri("vol2")]).stdout)["exports"][0]
    assert info["export-size"] == 8 * MiB
    for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache",
              "can_multi_conn"):
        assert info[k] is True, k
    assert info["is_read_only"] is False
    assert info["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in info["contexts"]


def test_map_sees_holes(nbd) -> None:
    u = nbd.uri("vol1")
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -P 2 8M 64k", u])
    m = json.loads(run(["nbdinfo", "--map", "--json", u]).stdout)
    data = [(e["offset"], e["length"]) for e in m if e["type"] == 0]
    assert data == [(MiB, MiB), (8 * MiB, 64 << 10)]
    qm = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json", u]).stdout)
    qdata = [(e["start"], e["length"]) for e in qm if e["data"]]
    assert qdata == data
    assert sum(e["length"] for e in qm) == 64 * MiB


def test_convert_compare_nbdcopy(nbd, tmp_path: Path) -> None:
    img = tmp_path / "in.raw"
    data = make_image(img, 16 * MiB)
    nbd.engine.create_volume("vol2", 16 * MiB)
    u2 = nbd.uri("vol2")
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), u2])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), u2])
    back = tmp_path / "back.raw"
    run(["nbdcopy", u2, str(back)])
    assert back.read_bytes() == data
    # nbdcopy into another volume with several connections, then compare and check holes
    nbd.engine.create_volume("vol3", 16 * MiB)
    u3 = nbd.uri("vol3")
    run(["nbdcopy", "--connections=4", "--requests=16", str(img), u3])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), u3])
    m = json.loads(run(["nbdinfo", "--map", "--json", u3]).stdout)
    allocated = sum(e["length"] for e in m if e["type"] == 0)
    assert allocated == 8 * MiB


def test_qemu_img_bench(nbd) -> None:
    u = nbd.uri("vol1")
    out = run(["qemu-img", "bench", "-f", "raw", "-w", "-c", "2000", "-d", "16", "-s", "4k", u]).stdout
    assert "Run completed" in out
    out = run(["qemu-img", "bench", "-f", "raw", "-c", "2000", "-d", "16", "-s", "64k", u]).stdout
    assert "Run completed" in out


def test_snapshot_export_is_read_only(nbd) -> None:
    u = nbd.uri("vol1")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", u])
    nbd.engine.volume("vol1").create_snapshot("s1")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 0 64k", "-c", "write -P 0x33 4M 64k", u])
    us = nbd.uri("vol1@s1")
    run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 4M 64k", us])
    info = json.loads(run(["nbdinfo", "--json", us]).stdout)["exports"][0]
    assert info["is_read_only"] is True
    m = json.loads(run(["nbdinfo", "--map", "--json", us]).stdout)
    assert [(e["offset"], e["length"]) for e in m if e["type"] == 0] == [(0, MiB)]
    # a write to the snapshot export is refused by the server with EPERM
    r = nbdsh(us, "h.set_strict_mode(0)\n"
                  "try:\n h.pwrite(b'x'*512, 0)\nexcept nbd.Error as e:\n print('ERR', e.errno)\n")
    assert "ERR EPERM" in r.stdout
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 0 64k", u])


def test_nbdsh_errors_from_the_server(nbd) -> None:
    u = nbd.uri("vol1")
    code = ("h.set_strict_mode(0)\n"
            "size = h.get_size()\n"
            "for name, fn in [('read', lambda: h.pread(4096, size - 100)),\n"
            "                 ('write', lambda: h.pwrite(b'y' * 4096, size - 100)),\n"
            "                 ('zero', lambda: h.zero(4096, size)),\n"
            "                 ('trim', lambda: h.trim(4096, size))]:\n"
            "    try:\n        fn(); print(name, 'OK')\n"
            "    except nbd.Error as e:\n        print(name, e.errno)\n"
            "h.pwrite(b'z' * 4096, 0, nbd.CMD_FLAG_FUA)\n"
            "assert h.pread(4096, 0) == b'z' * 4096\n"
            "h.cache(1 << 20, 0); h.flush()\n"
            "print('multi', h.can_multi_conn())\n")
    out = nbdsh(u, code).stdout
    assert "read EINVAL" in out and "write ENOSPC" in out
    assert "zero ENOSPC" in out and "trim EINVAL" in out
    assert "multi True" in out


def test_fio_verify(nbd, tmp_path: Path) -> None:
    if not have("fio"):
        pytest.skip("fio not installed")
    u = nbd.uri("vol1")
    job = ["fio", "--name=v", "--ioengine=nbd", f"--uri={u}", "--rw=randwrite", "--bs=4k",
           "--iodepth=32", "--size=32M", "--verify=crc32c", "--randseed=7"]
    run(job + ["--do_verify=1"], timeout=300, cwd=tmp_path)
    run(job + ["--verify_only=1"], timeout=300, cwd=tmp_path)
    mixed = ["fio", "--name=m", "--ioengine=nbd", f"--uri={u}", "--rw=randrw", "--bs=4k-64k",
             "--iodepth=16", "--size=8M", "--offset=40M", "--offset_increment=8M", "--verify=crc32c",
             "--do_verify=1",
             "--numjobs=2", "--group_reporting"]
    run(mixed, timeout=300, cwd=tmp_path)


def _certs(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    def ossl(*a: str) -> None:
        run(["openssl", *a])

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ovsfs test CA",
         "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"))
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{who}.ext").write_text(ext + "\n")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
             "-keyout", str(d / f"{who}-key.pem"), "-out", str(d / f"{who}.csr"))
        ossl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca-cert.pem"),
             "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
             "-extfile", str(d / f"{who}.ext"), "-out", str(d / f"{who}-cert.pem"))


def test_tls_with_qemu_img(engine, tmp_path: Path, start_inproc) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _certs(pki)
    engine.create_volume("vol1", 16 * MiB)
    h = start_inproc(engine, tmp_path / "tls", tls="required", tls_cert=str(pki / "server-cert.pem"),
                     tls_key=str(pki / "server-key.pem"), tls_ca=str(pki / "ca-cert.pem"))
    try:
        creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=client"
        opts = f"driver=nbd,host=127.0.0.1,port={h.port},export=vol1,tls-creds=tls0"
        img = tmp_path / "in.raw"
        data = make_image(img, 4 * MiB)
        run(["qemu-img", "convert", "-n", "--object", creds, "-f", "raw", str(img),
             "--target-image-opts", opts])
        run(["qemu-img", "compare", "--object", creds, "--image-opts",
             f"driver=file,filename={img}", opts])
        out = run(["qemu-io", "--object", creds, "--image-opts", opts, "-c", "read -v 0 16"]).stdout
        assert data[:4].hex() in out.replace(" ", "")
        # without TLS the TCP client is refused ...
        r = run(["qemu-img", "info", "-f", "raw", f"nbd://127.0.0.1:{h.port}/vol1"], check=False)
        assert r.returncode != 0 and "TLS" in r.stderr
        # ... a client without a certificate signed by the CA too ...
        nocert = tmp_path / "nocert"
        nocert.mkdir()
        (nocert / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
        r = run(["qemu-img", "info", "--object", f"tls-creds-x509,id=tls0,dir={nocert},endpoint=client",
                 "--image-opts", opts], check=False)
        assert r.returncode != 0
        # ... while the unix socket still serves without TLS
        run(["qemu-io", "-f", "raw", "-c", "read 0 4k", h.uri("vol1")])
        # libnbd speaks TLS too
        out = run(["nbdinfo", "--json",
                   f"nbds://127.0.0.1:{h.port}/vol1?tls-certificates={pki}"]).stdout
        assert json.loads(out)["exports"][0]["export-size"] == 16 * MiB
    finally:
        h.stop()
