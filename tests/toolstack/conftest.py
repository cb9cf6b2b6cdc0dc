import pytest

from host import Host


@pytest.fixture(scope="module")
def host():
    h = Host()
    try:
        yield h
    finally:
        h.close()
