"""A config override round-trips through its text: what a sweep writes on a command line
(`sweep.override_text`) is what `config.apply_overrides` reads back, type and value, floats to the
last bit, for every field of the experiment config."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

# The library, imported in one place.
from alexnet_jax.config import apply_overrides, choice_registries
from alexnet_jax.sweep import override_text
from experiments import digits

SCALE = 10 if settings.get_current_profile_name() == "slow" else 1


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


FIELDS = dict(_leaves(digits.get_config()))

# Finite floats only: `repr(inf)` is 'inf', which is not a Python literal (see the report).
floats = st.floats(allow_nan=False, allow_infinity=False)
ints = st.integers(-(2**70), 2**70)
VALUES = {
    bool: st.booleans(),
    int: ints,
    float: floats,
    str: st.text(),
    tuple: st.one_of(
        st.tuples(),
        st.lists(ints, max_size=5).map(tuple),
        st.lists(floats, max_size=5).map(tuple),
        st.lists(st.lists(floats, max_size=3).map(tuple), max_size=3).map(tuple),
    ),
}
KEYS = sorted(k for k, v in FIELDS.items() if type(v) in VALUES)


def _same(a, b):
    """Equal in type and value, recursively; -0.0 is not 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def test_every_field_type_is_generated():
    assert {type(FIELDS[k]) for k in KEYS} == set(VALUES)
    assert len(KEYS) == len(FIELDS)  # no field of another type escapes the property


@settings(max_examples=200 * SCALE, deadline=None)
@given(key=st.sampled_from(KEYS), at=st.data())
def test_override_text_parses_back_to_the_value(key, at):
    # A choice field takes only its registry's values (anything else exits 2 up front).
    choices = choice_registries().get(key)
    strategy = st.sampled_from(choices) if choices else VALUES[type(FIELDS[key])]
    value = at.draw(strategy, label=key)
    config = digits.get_config()
    apply_overrides(config, {key: override_text(value)})
    got = _get(config, key)
    assert _same(got, value), (key, override_text(value), got)


TUPLE_KEYS = sorted(k for k in KEYS if type(FIELDS[k]) is tuple)


@settings(max_examples=50 * SCALE, deadline=None)
@given(key=st.sampled_from(TUPLE_KEYS), value=st.one_of(ints, floats), as_list=st.lists(ints))
def test_a_tuple_field_takes_a_scalar_or_a_list(key, value, as_list):
    """What people type: `--config.optim.step_epochs=30` or `=[30,60]` is a tuple."""
    config = digits.get_config()
    apply_overrides(config, {key: repr(value)})
    assert _same(_get(config, key), (value,))
    apply_overrides(config, {key: repr(as_list)})
    assert _same(_get(config, key), tuple(as_list))
