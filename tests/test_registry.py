"""ray_lt.registry: duplicates fail, unknown names list the known ones and the closest."""

from __future__ import annotations

import pytest

from ray_lt.errors import RayLtError, UnknownNameError
from ray_lt.registry import Registry


def test_register_get_names():
    reg: Registry[int] = Registry("thing")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg


def test_duplicate_fails():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(RayLtError, match="duplicate thing 'a'"):
        reg.register("a")(2)


def test_unknown_lists_known_and_closest():
    reg: Registry[int] = Registry("stage kind")
    reg.register("cbd_student")(1)
    reg.register("ce")(2)
    with pytest.raises(UnknownNameError) as err:
        reg.get("cbd_studnet")
    msg = str(err.value)
    assert "unknown stage kind 'cbd_studnet'" in msg
    assert "known: cbd_student, ce" in msg and "did you mean 'cbd_student'" in msg
