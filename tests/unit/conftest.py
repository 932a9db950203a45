import pytest
import torch
from planted import planted_model, sentences


@pytest.fixture(scope="session")
def planted():
    """Shared read-only planted model; tests that could modify it must deep-copy it."""
    return planted_model()


@pytest.fixture(scope="session")
def texts():
    return sentences(24)


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"parameter {k} changed"
    leftover = [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not leftover, f"hooks left behind on {leftover}"
