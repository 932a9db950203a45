"""Bad input gets clear errors; long texts are chunked so every chunk starts like a sequence."""

import pytest

import tl_spikesink as ts
from tl_spikesink.corpus import read_text_file


def test_no_texts_and_empty_text_are_refused(planted):
    with pytest.raises(ts.SpikeSinkError, match="no texts"):
        ts.tokenize(planted, [])
    with pytest.raises(ts.SpikeSinkError, match="text 1 is empty"):
        ts.tokenize(planted, ["the cat", "   "])
    with pytest.raises(ts.SpikeSinkError, match="empty"):
        ts.scan(planted, [""], progress=False)


def test_long_text_is_chunked_each_chunk_starting_with_bos(planted):
    text = " ".join(["the cat sat"] * 50)  # 150 words, n_ctx is 64
    corpus = ts.tokenize(planted, text)
    bos = planted.tokenizer.bos_token_id
    assert [c.start for c in corpus.chunks] == [0, 63, 126]
    assert all(c.tokens[0] == bos and len(c.tokens) <= 64 for c in corpus.chunks)
    assert sum(len(c.tokens) - 1 for c in corpus.chunks) == 150
    r = ts.scan(planted, text, progress=False)
    firsts = {t.token for t in r.spikes.tokens if t.token.is_first}
    assert firsts == {ts.tokens.TokenRef(0, s, 0) for s in (0, 63, 126)}


def test_long_text_can_be_refused_or_truncated(planted):
    text = " ".join(["the cat sat"] * 50)
    with pytest.raises(ts.SpikeSinkError, match="long_texts='chunk'"):
        ts.tokenize(planted, text, long_texts="error")
    assert len(ts.tokenize(planted, text, long_texts="truncate").chunks) == 1
    with pytest.raises(ts.SpikeSinkError, match="max_seq_len"):
        ts.tokenize(planted, text, max_seq_len=1000)


def test_max_tokens_caps_the_corpus(planted, texts):
    corpus = ts.tokenize(planted, texts, max_tokens=50)
    assert corpus.n_tokens == 50
    r = ts.scan(planted, texts, max_tokens=50, progress=False)
    assert r.n_tokens == 50 and r.sinks.n_tokens == 50


def test_text_file_errors(tmp_path):
    with pytest.raises(ts.SpikeSinkError, match="cannot read"):
        read_text_file(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ts.SpikeSinkError, match="no non-empty line"):
        read_text_file(str(empty))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ts.SpikeSinkError, match="not UTF-8"):
        read_text_file(str(binary))


def test_default_corpus_is_offline_and_stable():
    a, b = ts.default_texts(), ts.default_texts()
    assert a == b and len(a) > 500 and all(len(t) >= 200 for t in a)


def test_not_a_transformerlens_model_is_refused():
    with pytest.raises(ts.SpikeSinkError, match="not a TransformerLens model"):
        ts.scan(object(), ["hi"], progress=False)


def test_missing_hook_point_is_named(planted, texts, monkeypatch):
    hooks = dict(planted.hook_dict)
    del hooks["blocks.1.attn.hook_pattern"]
    monkeypatch.setattr(type(planted), "hook_dict", property(lambda self: hooks), raising=False)
    with pytest.raises(ts.SpikeSinkError, match=r"blocks\.1\.attn\.hook_pattern"):
        ts.scan(planted, texts, progress=False)
