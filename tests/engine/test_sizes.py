"""Issue 10 item 6: one size rule at every entry point. A volume keeps the size it was
given, to the byte, for any multiple of 512 bytes (the last cluster may be partial);
anything else is refused with the one message of names.check_size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ovsfs.engine.engine import Engine
from ovsfs.engine.names import MAX_VOLUME_SIZE, check_size
from ovsfs.errors import InvalidArgument, OutOfRange

from .helpers import opened, small_config

CS = 4096
ODD = 1000448          # the image: 244 clusters and 1024 bytes (a multiple of 512, not of 4096)


@pytest.fixture
def engine(tmp_path: Path):
    eng = Engine(small_config(tmp_path))
    eng.open()
    eng.create_vpool("default")
    yield eng
    eng.close()


def _pattern(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(1, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("size", [0, 512, 1024, 4096 + 512, ODD, 1 << 30, MAX_VOLUME_SIZE])
def test_check_size_keeps_any_multiple_of_512(size: int) -> None:
    assert check_size(size) == size


@pytest.mark.parametrize("size", [-512, 1, 511, 1000, ODD + 1, MAX_VOLUME_SIZE + 512, 4096.0, "4096", True, None])
def test_check_size_refuses_the_rest_with_one_message(size: object) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_size(size)
    assert e.value.message == (f"bad volume size {size!r}: a size is a multiple of 512 bytes, "
                               f"from 0 to {MAX_VOLUME_SIZE} bytes")


def test_create_and_resize_use_the_one_rule(engine: Engine) -> None:
    messages = set()
    for call in (lambda: engine.create_volume("a", ODD + 1),
                 lambda: engine.create_volume("b", 1000)):
        with pytest.raises(InvalidArgument) as e:
            call()
        messages.add(e.value.message.split(":", 1)[1])
    vol = engine.create_volume("v", ODD)
    assert vol.size == ODD and vol.info()["size"] == ODD
    with pytest.raises(InvalidArgument) as e:
        vol.resize(ODD + 100)
    messages.add(e.value.message.split(":", 1)[1])
    assert len(messages) == 1          # the same words everywhere (only the value differs)
    assert vol.size == ODD


def test_partial_last_cluster_end_to_end(tmp_path: Path) -> None:
    cfg = small_config(tmp_path)
    data = _pattern(ODD, 1)
    with opened(cfg) as eng:
        eng.create_vpool("default")
        vol = eng.create_volume("v", ODD)
        vol.write(0, data[:CS * 100])                       # aligned part
        vol.writev([(CS * 100, data[CS * 100:ODD - 512]), (ODD - 512, data[ODD - 512:])])  # up to the last byte
        assert vol.read(0, ODD) == data
        assert vol.read(ODD - 1024, 1024) == data[-1024:]
        assert vol.readv([(ODD - 512, 512), (0, 512)]) == [data[-512:], data[:512]]
        assert vol.extents(0, ODD) == [(0, ODD, True)]      # stops at the byte size
        for bad in ((ODD - 512, 1024), (ODD, 512)):
            with pytest.raises(OutOfRange):
                vol.write(bad[0], bytes(bad[1]))
            with pytest.raises(OutOfRange):
                vol.read(*bad)
        with pytest.raises(OutOfRange):
            vol.extents(ODD - 512, 1024)
        # Trim of the tail drops the partial cluster whole.
        vol.trim(ODD - 1024, 1024)
        assert vol.read(ODD - 1024, 1024) == bytes(1024)
        ext = vol.extents(0, ODD)
        assert ext[-1] == (CS * (ODD // CS), ODD - CS * (ODD // CS), False)
        vol.write(ODD - 1024, data[-1024:])
        vol.create_snapshot("s")
        clone = eng.clone_volume("v", "s", "c")
        assert clone.size == ODD and clone.read(0, ODD) == data
    with opened(cfg) as eng:                                # the size and the bytes survive a restart
        vol = eng.volume("v")
        assert vol.size == ODD and vol.read(0, ODD) == data
        assert eng.volume("c").size == ODD


def test_growth_past_a_partial_cluster_reads_zeros(engine: Engine) -> None:
    vol = engine.create_volume("v", ODD)
    vol.write(0, _pattern(ODD, 2))
    vol.resize(ODD + 3 * 512)                               # grows inside the same last cluster
    assert vol.read(ODD, 3 * 512) == bytes(3 * 512)
    vol.resize(ODD + 10 * CS)
    assert vol.read(ODD, 10 * CS) == bytes(10 * CS)


def test_shrink_into_a_cluster_refuses_data_and_keeps_zeros(engine: Engine) -> None:
    vol = engine.create_volume("v", 8 * CS)
    vol.write(0, b"\x01" * (2 * CS + 512))                  # data up to 2 clusters + 512 bytes
    with pytest.raises(InvalidArgument, match=f"data is written at offset {2 * CS}"):
        vol.resize(2 * CS)                                   # would cut off 512 bytes of data
    with pytest.raises(InvalidArgument, match="cannot shrink"):
        vol.resize(CS + 512)
    vol.resize(2 * CS + 1024)                                # only zeros are cut off
    assert vol.size == 2 * CS + 1024
    vol.resize(4 * CS)
    assert vol.read(0, 4 * CS) == b"\x01" * (2 * CS + 512) + bytes(2 * CS - 512)


def test_empty_volume(engine: Engine) -> None:
    vol = engine.create_volume("z", 0)
    assert vol.size == 0 and vol.extents(0, 0) == [] and vol.read(0, 0) == b""
    with pytest.raises(OutOfRange):
        vol.write(0, bytes(512))
    vol.resize(1536)
    vol.write(512, b"\x07" * 512)
    assert vol.read(0, 1536) == bytes(512) + b"\x07" * 512 + bytes(512)
