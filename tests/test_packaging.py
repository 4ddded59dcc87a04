"""The layout: a plain checkout imports, the wheel claims no top-level name but `m0lite`, and nothing in the
repository root shadows another distribution's package (the README's "Layout")."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("kernels", "weights")  # folders at the top of the repository, reached as m0lite.kernels, m0lite.weights


def test_every_package_installs_under_m0lite():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert all(p == "m0lite" or p.startswith("m0lite.") for p in packages)
    where = {p: ROOT / p.replace(".", "/") for p in packages}
    assert all(d.is_dir() for d in where.values()), where
    # ...and every package folder of the tree is listed, so that a wheel misses none of them.
    on_disk = {d.parent for d in (ROOT / "m0lite").rglob("__init__.py")} | {ROOT / "m0lite" / t for t in TOP_LEVEL}
    assert on_disk == set(where.values()), sorted(map(str, on_disk ^ set(where.values())))


def test_top_level_folders_are_links_not_packages():
    """m0lite/kernels and m0lite/weights are links to the top-level folders, and those have no __init__.py: a
    folder without one is only a namespace portion, which any installed package of the same name outranks."""
    for name in TOP_LEVEL:
        link = ROOT / "m0lite" / name
        assert link.is_symlink() and link.resolve() == ROOT / name
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow the {name!r} distribution"


def _python(code, **env):
    """Runs `code` as `python -c` from the repository root (the root first on sys.path, as in a notebook),
    with the installed m0lite kept out, so that only the checkout can answer."""
    env = {**os.environ, "PYTHONNOUSERSITE": "1", **env}
    code = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n" + code
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_plain_checkout_imports_from_its_root():
    out = _python("import m0lite, m0lite.kernels.ops, m0lite.weights.loader\n"
                  "print(m0lite.kernels.ops.__file__); print(m0lite.weights.loader.__file__)")
    assert out.returncode == 0, out.stderr
    kernels_file, weights_file = map(Path, out.stdout.split())
    assert kernels_file.resolve().parent == ROOT / "kernels"
    assert weights_file.resolve().parent == ROOT / "weights"


def test_root_shadows_no_installed_package(tmp_path):
    """A distribution named like a top-level folder (Hugging Face's `kernels`, which transformers 5 imports)
    is what `import kernels` finds from the root, whether m0lite is imported first or not."""
    for name in TOP_LEVEL:
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("WHO = 'installed'\n")
    # The root comes first on sys.path (''), the stand-in distributions after it, as site-packages would.
    for first in ("", "import m0lite, m0lite.kernels.ops, m0lite.weights.loader\n"):
        out = _python(first + "import kernels, weights; print(kernels.WHO, weights.WHO)", PYTHONPATH=str(tmp_path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["installed", "installed"]
