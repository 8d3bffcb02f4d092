"""Every diffusers image DiT class (``fastcache_fx.zoo_classes``) with ``backend="fastcache"``:
approximation off equals eager, blocks found and approximated on a scripted trajectory, no
fallback (docs/supported-models.md is this table)."""

import pytest

from conformance import assert_conforms, names


@pytest.mark.parametrize("name", names("image"))
def test_conforms(name):
    assert_conforms(name)
