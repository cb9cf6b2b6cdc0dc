"""Fixtures shared by the engine tests: a fresh engine and its dom0 connection
(a test module may override ``engine``, e.g. with deferred introductions)."""

from __future__ import annotations

import pytest

from xenstore.core import Engine


@pytest.fixture
def engine():
    return Engine()


@pytest.fixture
def dom0(engine):
    return engine.connect()
