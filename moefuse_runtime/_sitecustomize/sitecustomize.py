"""Prepended to PYTHONPATH by ``moefuse run``: fusion in every Python process.

Imports nothing heavy: wrapt registers hooks by name, so moefuse_runtime (and
with it mlx) is imported only when a process imports mlx-lm's or exo's
(or mlx-vlm's) loaders. The install line goes to stderr even if the host sets
up no logging.

Python imports one ``sitecustomize``, the first on ``sys.path``: this one.
The next one there (a distribution's, a user's, another tool's) then runs
too, as it would have without ``moefuse run``; an error in it is reported as
Python reports one in its own ``sitecustomize``, and the process goes on.
"""

import importlib.machinery
import importlib.util
import logging
import os
import sys

import wrapt

# The modules of hooks.TARGETS (tests/test_first_forward.py keeps them in step).
for _target in ("mlx_lm.utils", "mlx_vlm.utils", "exo.worker.engines.mlx.utils_mlx"):
    wrapt.register_post_import_hook("moefuse_runtime.hooks:autopatch_on_import", _target)

_logger = logging.getLogger("moefuse_runtime")
if not _logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def _run_the_next_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    entries = [os.path.abspath(p or os.getcwd()) for p in sys.path]
    after = entries[entries.index(here) + 1 :] if here in entries else entries
    others = [p for p in after if p != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    try:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except Exception as error:  # noqa: BLE001 - as Python's site does: report, go on
        print(
            f"Error in sitecustomize ({spec.origin}); set PYTHONVERBOSE for traceback:\n"
            f"{type(error).__name__}: {error}",
            file=sys.stderr,
        )


_run_the_next_sitecustomize()
