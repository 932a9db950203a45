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
    assert result._repr_html_().startswith(("<pre>", "<!doctype html>"))
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


def test_mechanism_results_keep_the_contract(planted, texts, result):
    from tl_spikesink.mechanism import (
        first_tokens,
        head_decomposition,
        locality,
        quadratic_form,
        representations,
        short_range,
        silu_regime,
        sink_geometry,
    )
    from tl_spikesink.mechanism.claims import claims
    from tl_spikesink.mechanism.paper import paper_row
    from tl_spikesink.mechanism.vocab import vocab_probe
    from tl_spikesink.mechanism.weights import read_weights

    for r in (
        claims(planted, texts, result),
        silu_regime(planted, texts, result),
        quadratic_form(planted, texts, result),
        representations(planted, texts, result),
        sink_geometry(planted, texts, result),
        short_range(result),
        head_decomposition(planted, texts, result),
        read_weights(planted, result),
        vocab_probe(planted, result, progress=False),
        first_tokens(planted, texts, result),
        locality(planted, texts, result, min_query=8),
        paper_row(planted, texts, scan=result, progress=False),
    ):
        _check(r)
