import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msfp.checks import whole_number


@given(st.integers(), st.one_of(st.none(), st.integers(-5, 5)))
def test_whole_number_takes_integers_at_or_above_the_minimum(value, minimum):
    if minimum is not None and value < minimum:
        with pytest.raises(ValueError, match=rf"^n must be a whole number ≥ {minimum}, got {value}$"):
            whole_number("n", value, minimum)
    else:
        assert whole_number("n", value, minimum) == value


def test_whole_number_refuses_what_is_no_count_and_returns_a_python_int():
    for value in (True, False, 2.0, 2.5, "3", None, float("nan"), np.float64(1.0), [1]):
        with pytest.raises(ValueError, match=f"^{re.escape(f'n must be a whole number, got {value!r}')}$"):
            whole_number("n", value)
    for value in (np.int64(7), np.uint8(7), np.int32(7)):
        assert type(whole_number("n", value, 1)) is int and whole_number("n", value, 1) == 7
