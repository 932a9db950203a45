import pytest
from planted import planted_model, sentences


@pytest.fixture(scope="session")
def planted():
    """Shared read-only planted model; tests that could modify it must deep-copy it."""
    return planted_model()


@pytest.fixture(scope="session")
def texts():
    return sentences(24)
