"""Shared fixtures. (Helpers live in fastadagrad.testing: two conftest.py files in one
run are both imported as ``conftest``, so importing from one is unreliable.)"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)
