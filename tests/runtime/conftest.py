import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The default model's checkpoint directory (imported once into the cache on first use)."""
    from model.default_model import resolve_model

    return resolve_model(None)
