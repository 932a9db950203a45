"""GGUF files: checking the header before anything is allocated, and converting to TransformerLens.

transformers reads a GGUF into a config by mapping whichever metadata keys it finds and
filling the rest from the architecture's defaults, so a damaged or incomplete file does not
fail: it silently becomes a default-sized model (a 7B Llama) that is then allocated and filled
from too few tensors. :func:`validate` reads only the header (magic, version, metadata, tensor
table) and checks what the conversion relies on, so such a file fails in milliseconds with a
message naming the problem.

Conversion folds the RMSNorm gains (exact) but never centres the residual stream or the
unembedding: massive activations live in the raw residual channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_spikesink.anatomy import NORM_SCALE_ATTR
from tl_spikesink.errors import SpikeSinkError

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
"""Version 1 stored counts as 32-bit and is long obsolete; llama.cpp writes version 3."""
DEFAULT_ALIGNMENT = 32
"""Tensor data alignment when ``general.alignment`` is absent (the GGUF specification's)."""

_COMMON_KEYS = (
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.layer_norm_rms_epsilon",
)  # fmt: skip
REQUIRED_KEYS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "llama": _COMMON_KEYS,
        "qwen2": _COMMON_KEYS,
        # transformers' Gemma 3 defaults (head_dim 256, window 4096) fit only some sizes.
        "gemma3": (*_COMMON_KEYS, "attention.key_length", "attention.sliding_window"),
    }
)
"""Per architecture, the ``<arch>.``-prefixed keys without which transformers falls back to
its defaults. ``attention.head_count_kv`` is optional: absent means one key/value head per
query head, in llama.cpp and transformers alike."""
FLOAT_KEYS = frozenset({"attention.layer_norm_rms_epsilon"})
"""Required keys holding a positive number; the others hold a positive integer."""
TOKENIZER_KEY = "tokenizer.ggml.tokens"
"""The vocabulary, which the tokenizer and (when ``vocab_size`` is absent) the config need."""
BLOCK_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)  # fmt: skip
"""Tensors (``blk.<i>.<name>.weight``) every block of all three architectures has."""
GLOBAL_TENSORS = ("token_embd.weight", "output_norm.weight")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 8  # ggml uses 4; more means the tensor table is garbage


@dataclasses.dataclass(frozen=True)
class GGUFArray:
    """An array value of the header, kept as its element type and length only.

    The vocabulary and merges are arrays of ~50k strings each; keeping them would make
    reading the header slow and memory-hungry for no use.
    """

    element_type: int
    count: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    Attributes:
        name: Its GGUF name, e.g. ``blk.0.attn_q.weight``.
        shape: Dimensions in GGUF order (fastest-varying first).
        ggml_type: The ggml type id (0 = F32, 8 = Q8_0, ...).
        offset: Byte offset of its data from the start of the data section.
        nbytes: Its data size, or None for a type newer than the ``gguf`` package knows.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int | None


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file declares about itself, read without touching its tensor data.

    Attributes:
        path: The file.
        version: GGUF format version.
        metadata: Key/value metadata; arrays as :class:`GGUFArray`.
        tensors: The tensor table.
        data_offset: Where the tensor data section starts.
        file_size: The file's size in bytes.
    """

    path: Path
    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        """``general.architecture``, or None when absent or not a string."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def data_end(self) -> int:
        """The byte just past the last tensor's data (types of unknown size count as empty)."""
        ends = (t.offset + (t.nbytes or 0) for t in self.tensors)
        return self.data_offset + max(ends, default=0)


class _Truncated(Exception):
    def __init__(self, what: str, need: int) -> None:
        super().__init__(what)
        self.what, self.need = what, need


class _Cursor:
    """Bounded reads: a garbage length must fail as truncation, not allocate gigabytes."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size, self.pos = fh, size, 0

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Truncated(what, self.pos + n)
        self.fh.seek(n, 1)
        self.pos += n

    def read(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise _Truncated(what, self.pos + n)
        self.pos += n
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        return self.read(self.unpack("<Q", what), what).decode("utf-8")


def _damaged(path: Path, problem: str) -> SpikeSinkError:
    return SpikeSinkError(
        f"{path} has a damaged GGUF header ({problem}). Download or export the file again."
    )


def _value(cur: _Cursor, vtype: int, key: str, path: Path) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype], f"the value of {key}")
    if vtype == _STRING:
        return cur.string(f"the value of {key}")
    if vtype != _ARRAY:
        raise _damaged(path, f"metadata {key!r} has unknown value type {vtype}")
    etype, count = cur.unpack("<I", key), cur.unpack("<Q", key)
    what = f"the array {key}"
    if etype in _SCALARS:
        cur.skip(count * struct.calcsize(_SCALARS[etype]), what)
    elif etype in (_STRING, _ARRAY):
        if count * 8 > cur.size - cur.pos:  # each element is at least a length
            raise _Truncated(what, cur.pos + count * 8)
        for _ in range(count):
            if etype == _STRING:
                cur.skip(cur.unpack("<Q", what), what)
            else:
                _value(cur, _ARRAY, key, path)
    else:
        raise _damaged(path, f"array {key!r} has unknown element type {etype}")
    return GGUFArray(etype, count)


def read_header(path: Path) -> GGUFHeader:
    """Read the header and tensor table of ``path``, never its tensor data.

    gguf.GGUFReader would decode the whole vocabulary first, seconds per call; this reader
    skips over arrays.

    Raises:
        SpikeSinkError: Not a GGUF file, an unsupported version, or a truncated or damaged
            header.
    """
    from gguf.constants import GGML_QUANT_SIZES

    size = path.stat().st_size
    with open(path, "rb") as fh:
        cur = _Cursor(fh, size)
        try:
            magic = cur.read(4, "the magic number") if size >= 4 else fh.read(4)
            if magic != MAGIC:
                raise SpikeSinkError(
                    f"{path} is not a GGUF file (it starts with {magic!r}, not {MAGIC!r}). Pass "
                    "a .gguf model file, such as one exported by llama.cpp."
                )
            version = cur.unpack("<I", "the version")
            if version not in SUPPORTED_VERSIONS:
                swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
                order = " (a big-endian file)" if swapped in SUPPORTED_VERSIONS else ""
                raise SpikeSinkError(
                    f"{path} is GGUF version {version}{order}; tl_spikesink reads little-endian "
                    f"versions {', '.join(map(str, SUPPORTED_VERSIONS))}. Re-export the model "
                    "with a current llama.cpp (convert_hf_to_gguf.py)."
                )
            n_tensors, n_kv = cur.unpack("<Q", "the tensor count"), cur.unpack("<Q", "the kv count")
            metadata: dict[str, Any] = {}
            for i in range(n_kv):
                key = cur.string(f"metadata key {i + 1} of {n_kv}")
                metadata[key] = _value(cur, cur.unpack("<I", f"the type of {key}"), key, path)
            tensors = []
            for i in range(n_tensors):
                what = f"tensor entry {i + 1} of {n_tensors}"
                name, n_dims = cur.string(what), cur.unpack("<I", what)
                if n_dims > _MAX_DIMS:
                    raise _damaged(path, f"tensor {name!r} claims {n_dims} dimensions")
                shape = tuple(cur.unpack("<Q", what) for _ in range(n_dims))
                ggml_type, offset = cur.unpack("<I", what), cur.unpack("<Q", what)
                nbytes = None
                if ggml_type in GGML_QUANT_SIZES:
                    block, type_size = GGML_QUANT_SIZES[ggml_type]
                    nbytes = -(-_numel(shape) // block) * type_size
                tensors.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
        except _Truncated as exc:
            raise SpikeSinkError(
                f"{path} is truncated or damaged: reading {exc.what} needs {exc.need:,} bytes, "
                f"but the file has {size:,}. Download or export it again."
            ) from exc
        except UnicodeDecodeError as exc:
            raise _damaged(path, f"a key or string is not UTF-8: {exc}") from exc
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise _damaged(path, f"general.alignment is {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment
    return GGUFHeader(path, version, MappingProxyType(metadata), tuple(tensors), data_offset, size)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def architecture(path: Path) -> str:
    """Return the ``general.architecture`` of ``path``, one tl_spikesink converts.

    Raises:
        SpikeSinkError: An unreadable header, or an architecture other than those of
            :data:`CFG_BUILDERS`.
    """
    return _supported_architecture(read_header(path))


def _supported_architecture(header: GGUFHeader) -> str:
    arch = header.architecture
    if arch not in CFG_BUILDERS:
        shown = "<missing>" if arch is None else arch
        raise SpikeSinkError(
            f"{header.path} holds a {shown!r} model; tl_spikesink converts only "
            f"{', '.join(sorted(CFG_BUILDERS))} GGUF files. Use one of those architectures."
        )
    return arch


def validate(path: Path) -> GGUFHeader:
    """Check that ``path`` holds a complete model of a supported architecture.

    Checks the magic, version, architecture, the metadata keys the conversion needs (present
    and positive), the tensor table (every block's weights, the embedding's width) and that
    the declared tensor data fits in the file. Reads only the header.

    Returns:
        The header.

    Raises:
        SpikeSinkError: Naming the first problem found and the fix.
    """
    header = read_header(path)
    arch = _supported_architecture(header)
    meta = header.metadata
    keys = [f"{arch}.{k}" for k in REQUIRED_KEYS[arch]]
    missing = [k for k in (*keys, TOKENIZER_KEY) if k not in meta]
    if missing:
        raise SpikeSinkError(
            f"{path} is a {arch} GGUF without the metadata {', '.join(missing)}, which the "
            f"conversion needs (transformers would silently use its default {arch} "
            "configuration instead). The file is incomplete: export it again with llama.cpp's "
            "convert_hf_to_gguf.py, or download it again."
        )
    for key in keys:
        value = meta[key]
        wanted = (int, float) if key.removeprefix(f"{arch}.") in FLOAT_KEYS else (int,)
        if not isinstance(value, wanted) or isinstance(value, bool) or not value > 0:
            kind = "number" if float in wanted else "integer"
            raise SpikeSinkError(
                f"{path}: metadata {key} is {value!r}, not a positive {kind}. The file is "
                "damaged or was written by a broken exporter; export it again."
            )
    if not isinstance(meta[TOKENIZER_KEY], GGUFArray) or not meta[TOKENIZER_KEY].count:
        raise SpikeSinkError(
            f"{path}: {TOKENIZER_KEY} holds no vocabulary. Export the file again with its "
            "tokenizer."
        )
    _check_tensors(header, arch, meta[f"{arch}.block_count"], meta[f"{arch}.embedding_length"])
    return header


def _check_tensors(header: GGUFHeader, arch: str, n_blocks: int, d_model: int) -> None:
    path, tensors = header.path, {t.name: t for t in header.tensors}
    needed = len(GLOBAL_TENSORS) + n_blocks * len(BLOCK_TENSORS)
    absent: list[str] = []
    if len(tensors) < needed:
        problem = f"at least {needed}"
    else:
        names = (f"blk.{i}.{t}.weight" for i in range(n_blocks) for t in BLOCK_TENSORS)
        absent = [n for n in (*GLOBAL_TENSORS, *names) if n not in tensors]
        problem = f"{len(absent)} more ({', '.join(absent[:3])}{', ...' if absent[3:] else ''})"
    if len(tensors) < needed or absent:
        raise SpikeSinkError(
            f"{path} declares {len(tensors)} tensors, but a {n_blocks}-block {arch} model needs "
            f"{problem}. The file is incomplete or its block_count is wrong; download or export "
            "it again."
        )
    embed = tensors["token_embd.weight"]
    if not embed.shape or embed.shape[0] != d_model:
        raise SpikeSinkError(
            f"{path}: token_embd.weight has shape {embed.shape} but {arch}.embedding_length "
            f"is {d_model}. The metadata does not describe these weights; export the file again."
        )
    if header.data_end > header.file_size:
        raise SpikeSinkError(
            f"{path} is truncated: its {len(tensors)} tensors end at byte {header.data_end:,}, "
            f"but the file has {header.file_size:,} bytes. Download or export it again."
        )


# --- conversion -------------------------------------------------------------------------


def llama_like_cfg(hf: Any) -> dict[str, Any]:
    """The HookedTransformerConfig fields of a Llama or Qwen2 transformers config.

    Mirrors transformer_lens.loading_from_pretrained.convert_hf_model_config, which takes only
    hub names or folders; the integration tests check that the two agree.
    """
    from transformer_lens.loading_from_pretrained import _apply_llama3_rope_scaling, _get_rope_theta

    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    kv, qwen = hf.num_key_value_heads, hf.model_type == "qwen2"
    cfg = {
        "d_model": hf.hidden_size, "d_head": d_head, "n_heads": hf.num_attention_heads,
        # TransformerLens's Llama uses grouped-query attention only when head counts differ.
        "n_key_value_heads": kv if qwen or kv != hf.num_attention_heads else None,
        "d_mlp": hf.intermediate_size, "n_layers": hf.num_hidden_layers,
        "n_ctx": hf.max_position_embeddings, "eps": hf.rms_norm_eps, "d_vocab": hf.vocab_size,
        "act_fn": hf.hidden_act, "normalization_type": "RMS",
        "positional_embedding_type": "rotary", "rotary_adjacent_pairs": False,
        "rotary_dim": d_head, "rotary_base": _get_rope_theta(hf), "final_rms": True,
        "gated_mlp": True, "initializer_range": hf.initializer_range,
        "original_architecture": "Qwen2ForCausalLM" if qwen else "LlamaForCausalLM",
    }  # fmt: skip
    if qwen:
        cfg["rotary_base"] = int(cfg["rotary_base"])
    else:
        _apply_llama3_rope_scaling(cfg, hf)
    return cfg


def gemma3_cfg(hf: Any) -> dict[str, Any]:
    """The HookedTransformerConfig fields of a text-only Gemma 3 transformers config.

    Raises:
        SpikeSinkError: Rope scaling, which the larger (multimodal) Gemma 3 models use.
    """
    rope = getattr(hf, "rope_parameters", None) or {}
    full, local = rope.get("full_attention", {}), rope.get("sliding_attention", {})
    if full.get("rope_type", "default") != "default":
        raise SpikeSinkError(
            f"This Gemma 3 uses {full['rope_type']!r} rope scaling, which tl_spikesink does not "
            "convert. Use a text-only Gemma 3 (270M or 1B)."
        )
    cap = lambda v: -1.0 if v is None else float(v)  # noqa: E731 - -1 is TransformerLens's "off"
    return {
        "d_model": hf.hidden_size, "d_head": hf.head_dim, "n_heads": hf.num_attention_heads,
        "n_key_value_heads": hf.num_key_value_heads, "d_mlp": hf.intermediate_size,
        "n_layers": hf.num_hidden_layers, "eps": hf.rms_norm_eps, "d_vocab": hf.vocab_size,
        "n_ctx": min(hf.max_position_embeddings, 8192),  # TransformerLens's Gemma 3 cap
        "act_fn": hf.hidden_activation, "initializer_range": hf.initializer_range,
        "normalization_type": "RMS", "positional_embedding_type": "rotary",
        "rotary_base": full.get("rope_theta", getattr(hf, "rope_theta", 1_000_000)),
        "rotary_base_local": local.get("rope_theta", getattr(hf, "rope_local_base_freq", 10_000)),
        "use_attn_scale": True, "attn_scale": float(hf.query_pre_attn_scalar) ** 0.5,
        "attn_scores_soft_cap": cap(hf.attn_logit_softcapping),
        "output_logits_soft_cap": cap(hf.final_logit_softcapping),
        "gated_mlp": True, "final_rms": True, "use_normalization_before_and_after": True,
        "use_qk_norm": True, "use_local_attn": True, "window_size": hf.sliding_window,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in hf.layer_types],
        "original_architecture": "Gemma3ForCausalLM",
    }  # fmt: skip


CFG_BUILDERS = MappingProxyType(
    {"llama": llama_like_cfg, "qwen2": llama_like_cfg, "gemma3": gemma3_cfg}
)
"""GGUF ``general.architecture`` → builder of the HookedTransformerConfig fields."""


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    if quiet:
        hf_logging.disable_progress_bar()
        # The GGUF de-quantization bar ignores transformers' own switch.
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert(path: Path, progress: bool) -> tuple[HookedTransformer, Any]:
    """Convert the GGUF at ``path`` to a float32 CPU ``HookedTransformer`` and its tokenizer.

    transformers dequantizes the file and TransformerLens's own weight converters map the
    weights, so the result matches what TransformerLens would build from the original model.

    Raises:
        SpikeSinkError: The file fails :func:`validate`.
    """
    from transformer_lens.pretrained import weight_conversions as wc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = _supported_architecture(validate(path))
    if progress:
        logger.info("Converting %s (%s) to TransformerLens", path.name, arch)
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    with _quiet_transformers(not progress):
        hf = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    # Already dequantized; the GGUF marker would make TransformerLens refuse the weights.
    del hf.config.quantization_config
    hf.hf_quantizer = None
    bos, first = tokenizer.bos_token_id, tokenizer("hi").input_ids[:1]
    cfg = HookedTransformerConfig.from_dict(
        {**CFG_BUILDERS[arch](hf.config), "model_name": path.stem, "init_weights": False,
         "device": "cpu", "dtype": torch.float32, "tokenizer_name": None,
         "default_prepend_bos": bos is not None and first == [bos]}
    )  # fmt: skip
    converter = {
        "LlamaForCausalLM": wc.convert_llama_weights,
        "Qwen2ForCausalLM": wc.convert_qwen2_weights,
        "Gemma3ForCausalLM": wc.convert_gemma_weights,
    }[cfg.original_architecture]
    with torch.no_grad():
        # Clones, because tied embeddings share storage and folding edits tensors in place.
        state_dict = {k: v.detach().clone() for k, v in converter(hf, cfg).items()}
        del hf
        model = HookedTransformer(cfg, move_to_device=False)
        gain = state_dict.get("blocks.0.ln1.w")  # folding removes it; §3.1.3 compares with it
        model.load_and_process_state_dict(
            state_dict, fold_ln=True, center_writing_weights=False, center_unembed=False,
            fold_value_biases=True, refactor_factored_attn_matrices=False,
        )  # fmt: skip
    if gain is not None:
        setattr(model, NORM_SCALE_ATTR, gain.float().clone())
    return model, tokenizer
