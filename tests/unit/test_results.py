"""The result contract: frozen, a short repr, strict JSON (no NaN token), readable str."""

import dataclasses
import json

import pytest

import tl_spikesink as ts
from tl_spikesink.results import MAX_REPR, Result


@pytest.fixture(scope="module")
def result(planted, texts):
    return ts.scan(planted, texts, progress=False)


def _check(result: Result) -> None:
    assert isinstance(result, Result)
    assert dataclasses.is_dataclass(result)
    field = dataclasses.fields(result)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, field, None)
    assert len(repr(result)) <= MAX_REPR
    assert repr(result).startswith(type(result).__name__ + "(")
    json.loads(result.to_json())  # strict: json_text refuses NaN, so this parsed text has none
    assert "NaN" not in result.to_json()
    assert result._repr_html_().startswith("<pre>")
    assert str(result)


def test_scan_and_its_parts_keep_the_contract(result):
    for r in (result, result.spikes, result.sinks):
        _check(r)


def test_evaluation_and_interventions_keep_the_contract(planted, texts, result):
    iv = ts.sink_key_removal(result, heads="all")
    ev = ts.evaluate(planted, texts[:3], iv, progress=False)
    _check(ev)
    _check(iv)
    assert len(repr(ev)) < 1000  # it used to print every tensor of its scan


def test_short_repr_names_shapes_not_values(result):
    text = repr(result.spikes)
    assert "Tensor[" in text and "tensor(" not in text
