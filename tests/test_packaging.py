"""The installed distribution claims no top-level name but `m0lite`, and ships every package of the tree."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_installs_under_m0lite():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = setuptools["packages"], setuptools.get("package-dir", {})
    assert all(p == "m0lite" or p.startswith("m0lite.") for p in packages)
    # Each listed package is a folder with an __init__.py: m0lite.x.y lives in m0lite/x/y unless package-dir says.
    where = {p: ROOT / dirs.get(p, p.replace(".", "/")) for p in packages}
    assert all((d / "__init__.py").is_file() for d in where.values()), where
    # ...and every package folder of the tree is listed, so that a wheel misses none of them.
    on_disk = {d.parent for top in {ROOT / "m0lite", *(ROOT / d for d in dirs.values())} for d in top.rglob("__init__.py")}
    assert on_disk == set(where.values()), sorted(map(str, on_disk ^ set(where.values())))


def test_kernels_and_weights_import_inside_the_namespace():
    import m0lite.kernels
    import m0lite.weights.loader

    assert Path(m0lite.kernels.__file__).parent == ROOT / "kernels"
    assert Path(m0lite.weights.loader.__file__).parent == ROOT / "weights"
