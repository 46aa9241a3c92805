"""Doors and the management API use only the door contract (issue 10, item 1;
ovsfs/engine/api.py): no reaching into the engine's or a volume's internals.

Checked from the source with `ast` (nothing imported, like tests/test_layers.py):
- in every door package and the management API, no `<engine>.volumes`, `.store`, `.cfg`,
  `.wb` on anything named `engine`/`_engine`, and no `.users` / `.meta` at all (a
  volume's internals: holders and records come from the catalog);
- in the FUSE door (start-up script `__main__.py` aside, which builds the engine), the
  engine object is used for nothing but `.catalog`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ovsfs"
PACKAGES = ["fuse", "nbd", "shm", "mgmt", "doors"]
ENGINE_ATTRS = {"volumes", "store", "cfg", "wb"}
VOLUME_ATTRS = {"users", "meta"}


def _owner(node: ast.expr) -> str:
    """The last name of what an attribute is taken from: `self.engine.x` -> "engine"."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _owner(node.func)
    return ""


def _is_engine(name: str) -> bool:
    return name.lstrip("_") == "engine"


def _attributes(path: Path) -> list[tuple[int, str, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(n.lineno, _owner(n.value), n.attr) for n in ast.walk(tree) if isinstance(n, ast.Attribute)]


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def internals(path: Path) -> list[str]:
    out = []
    for line, owner, attr in _attributes(path):
        if (attr in ENGINE_ATTRS and _is_engine(owner)) or attr in VOLUME_ATTRS:
            out.append(f"{path.relative_to(ROOT.parent)}:{line}: {owner}.{attr}")
    return out


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_engine_or_volume_internals(pkg: str) -> None:
    assert _files(pkg), f"ovsfs/{pkg} has no source: the check would pass vacuously"
    found = [hit for f in _files(pkg) for hit in internals(f)]
    assert found == [], "use the contract (ovsfs/engine/api.py) instead of:\n" + "\n".join(found)


def test_fuse_uses_only_the_catalog() -> None:
    found = []
    for f in _files("fuse"):
        if f.name == "__main__.py":
            continue
        found += [f"{f.relative_to(ROOT.parent)}:{line}: {owner}.{attr}"
                  for line, owner, attr in _attributes(f) if _is_engine(owner) and attr != "catalog"]
    assert found == [], "the FUSE door uses only engine.catalog:\n" + "\n".join(found)


def test_the_check_sees_what_it_forbids(tmp_path: Path) -> None:
    """The scanner itself finds each forbidden access and passes the allowed ones."""
    src = tmp_path / "door.py"
    src.write_text("def f(self, engine, vol):\n"
                   "    self.engine.volumes; engine.store.usage(); self._engine.cfg; engine.wb\n"
                   "    vol.users; vol.meta.get('created'); self.cfg.nbd; engine.catalog.stat('v')\n")
    hits = sorted(f"{owner}.{attr}" for _line, owner, attr in _attributes(src)
                  if (attr in ENGINE_ATTRS and _is_engine(owner)) or attr in VOLUME_ATTRS)
    assert hits == sorted(["engine.volumes", "engine.store", "_engine.cfg", "engine.wb",
                           "vol.users", "vol.meta"])
