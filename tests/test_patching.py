"""patching: the one wrapt helper behind every patch (hooks, shard, mlx-vlm helpers)."""

from __future__ import annotations

import sys
import types

import pytest

from moefuse_runtime.patching import arguments, unwrap, wrap, wrapper_of


@pytest.fixture
def library():
    """A module with a loader, and another module that imported it by name."""
    lib = types.ModuleType("fake_library")
    exec("def load(repo, pipeline_group=None, tensor_group=None):\n    return repo\n", lib.__dict__)
    user = types.ModuleType("fake_user")
    user.load = user.load_it = lib.load
    sys.modules.update(fake_library=lib, fake_user=user)
    yield lib, user
    del sys.modules["fake_library"], sys.modules["fake_user"]


def shout(wrapped, instance, args, kwargs):
    return wrapped(*args, **kwargs).upper()


def test_wrap_once_and_every_alias(library):
    lib, user = library
    original = lib.load
    assert wrap(lib, "load", shout, aliases=True)
    assert not wrap(lib, "load", shout, aliases=True)  # idempotent
    assert wrapper_of(lib.load) is shout and lib.load.__wrapped__ is original
    assert user.load is lib.load and user.load_it is lib.load
    assert user.load_it("repo") == "REPO"
    assert unwrap(lib, "load", shout, aliases=True)
    assert lib.load is original and user.load is original and user.load_it is original
    assert not unwrap(lib, "load", shout)


def test_enabled_decides_at_every_call(library):
    lib, _ = library
    on = [True]
    wrap(lib, "load", shout, enabled=lambda: on[0])
    assert lib.load("repo") == "REPO"
    on[0] = False
    assert lib.load("repo") == "repo"


def test_a_class_method_inherited_is_wrapped_on_the_class():
    class Base:
        def shard(self, group=None):
            return group

    class Model(Base):
        pass

    def double(wrapped, instance, args, kwargs):
        assert isinstance(instance, Model)
        return 2 * wrapped(*args, **kwargs)

    assert wrap(Model, "shard", double) and not wrap(Model, "shard", double)
    assert Model().shard(group=3) == 6 and Model().shard(3) == 6
    assert Base().shard(3) == 3


def test_arguments_are_read_by_name_whatever_their_position(library):
    lib, _ = library
    for args, kwargs in [(("r", None, "tp"), {}), (("r",), {"tensor_group": "tp"})]:
        given = arguments(lib.load, args, kwargs)
        assert given == {"repo": "r", "pipeline_group": None, "tensor_group": "tp"}
    assert arguments(lib.load, (), {"nope": 1}) == {}
