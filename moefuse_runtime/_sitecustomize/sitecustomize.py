"""Prepended to PYTHONPATH by ``moefuse run``: fusion in every Python process.

Imports nothing heavy: wrapt registers hooks by name, so moefuse_runtime (and
with it mlx) is imported only when a process imports mlx-lm's or exo's
(or mlx-vlm's) loaders. The install line goes to stderr even if the host sets up no logging.
"""

import logging

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
