"""Every diffusers image DiT class (``fastcache_fx.zoo_classes``) under the default options and the
fast setting, through a bare ``torch.compile(model, backend="fastcache")`` and through
``enable_fastcache``: no fallback, every block list approximated on a scripted trajectory, each
step equal to an eager replay of its decisions with the cached residuals (docs/supported-models.md
is this table)."""

import pytest

from conformance import assert_conforms, cells


@pytest.mark.parametrize("name, rule, entry", cells("image"))
def test_conforms(name, rule, entry):
    assert_conforms(name, rule, entry)


def test_dit_default_rule_bare_backend():
    """The default tier's cell: the DiT, default options, bare torch.compile."""
    assert_conforms("DiTTransformer2DModel", "default", "backend")
