"""Makes the name `kernels` mean the installed Hugging Face package, for transformers.

transformers imports the `kernels` distribution (one of its requirements) by its
top-level name. This repository's own kernels/ folder, installed as m0lite.kernels,
answers to that name too whenever the repository root is on sys.path (pytest and
`python -m` put it there), and transformers' import then fails. Importing the
installed package first, with the root off the path, settles the name: a module
already imported is what every later `import kernels` gets.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load() -> None:
    mod = sys.modules.get("kernels")
    if mod is not None and not str(getattr(mod, "__file__", "") or "").startswith(str(ROOT)):
        return  # the installed package already
    sys.modules.pop("kernels", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: then transformers does not import it either
    finally:
        sys.path[:] = saved


_load()
