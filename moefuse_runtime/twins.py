"""Twin classes: a live module's class rebound to a subclass that adds one behaviour.

A fused layer (`layer.FusedSwitchGLU`), an armed layer (`first_forward.Armed`)
and a compiled MoE block (`blocks.CompiledBlock`) are the model's own module
with its ``__class__`` rebound to ``twin_class(mixin, original)``: the class
``(mixin, original)``, made once per pair and named ``<PREFIX><Original>``
(``FusedSwitchGLU``, ``ArmedSwitchGLU``, ``CompiledQwen3MoeSparseMoeBlock``).
The module keeps every attribute the model set; `original_class` is the way
back.

The made class is not importable, so a twin pickles and deep-copies as the
pair it was made from (`Twin.__reduce_ex__`): pickle finds the mixin and the
original class by name and rebuilds the twin from them.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

_TWINS: dict[tuple[type, type], type] = {}
_LOCK = threading.Lock()


class Twin:
    """The base of the mixins. Its made classes carry ``original`` (the class
    the model made) and ``mixin`` (the behaviour added)."""

    PREFIX: ClassVar[str] = ""
    original: ClassVar[type]
    mixin: ClassVar[type]

    @classmethod
    def twin_attributes(cls, original: type) -> dict[str, Any]:
        """Class attributes a mixin's twin of ``original`` holds besides the pair."""
        return {}

    def __reduce_ex__(self, protocol: Any) -> tuple:
        reduced: Any = super().__reduce_ex__(protocol)
        return (_new_twin, (type(self).mixin, type(self).original), *reduced[2:])


def twin_class(mixin: type, original: type) -> type:
    """The ``mixin`` twin of ``original`` (made once; thread-safe)."""
    key = (mixin, original)
    twin = _TWINS.get(key)
    if twin is None:
        with _LOCK:
            twin = _TWINS.get(key)
            if twin is None:
                behaviour: Any = mixin
                attributes = {
                    "original": original,
                    "mixin": mixin,
                    "__module__": __name__,
                    **behaviour.twin_attributes(original),
                }
                name = f"{behaviour.PREFIX}{original.__name__}"
                twin = _TWINS[key] = type(name, (mixin, original), attributes)
    return twin


def original_class(cls: type, mixin: type = Twin) -> type:
    """The class the model made: the original of a ``mixin`` twin (of any
    twin by default), else ``cls`` itself."""
    return cls.__dict__["original"] if is_twin(cls, mixin) else cls


def is_twin(cls: type, mixin: type) -> bool:
    return issubclass(cls, mixin) and "original" in cls.__dict__


def _new_twin(mixin: type, original: type) -> object:
    twin: Any = twin_class(mixin, original)
    return twin.__new__(twin)
