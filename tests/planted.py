"""Tiny models with spikes and sinks planted by hand, so every expected number is known.

Residual channels (d_model = 16):
  0  BOS marker: the key feature of the planted sink head (layer 0, head 0)
  1  constant 1 on every token: the query feature of the sink head
  2  spike trigger (BOS and "."): read by the step-up MLP of layer 1
  3  "." marker, so "." has the same norm as BOS and gets exactly the same spike
  7  spike channel: layer 1's MLP writes SPIKE here; layer 2's MLP cancels it
  4-6, 8-15  small seeded noise on ordinary words (so layer medians are ordinary)
Every other weight is zero, so heads other than (0, 0) attend uniformly and only the planted
MLP neurons write anything.
"""

from __future__ import annotations

import functools
import tempfile

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

WORDS = "the a cat dog sat ran on under mat rug and then it was big small red blue".split()
VOCAB = ["<bos>", "<pad>", "<unk>", "."] + WORDS
SPIKE_CHANNEL = 7
SINK_HEAD = (0, 0)
SPIKE = 3000.0
N_LAYERS, N_HEADS = 3, 2


@functools.cache
def _tokenizer_dir() -> str:
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<pad>",
    )
    # TransformerLens reloads tokenizers by path to add BOS, so the tokenizer must live on disk.
    path = tempfile.mkdtemp(prefix="planted-tokenizer-")
    fast.save_pretrained(path)
    return path


def tokenizer() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(_tokenizer_dir())


def planted_model(
    seed: int = 0, n_ctx: int = 64, positional: str = "standard"
) -> HookedTransformer:
    """A 3-layer pre-norm RMS, SwiGLU model with one sink head and one massive activation."""
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS,
        d_model=16,
        n_heads=N_HEADS,
        d_head=4,
        d_mlp=8,
        d_vocab=len(VOCAB),
        n_ctx=n_ctx,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type=positional,
        default_prepend_bos=True,
        model_name="planted",
        seed=seed,
    )
    model = HookedTransformer(cfg, tokenizer())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.fill_(1.0)  # RMSNorm weights
        emb = model.embed.W_E
        noise_channels = [4, 5, 6, *range(8, 16)]
        emb[:, 1] = 1.0
        emb[:, noise_channels] = 0.5 * torch.randn(len(VOCAB), len(noise_channels), generator=gen)
        bos, dot = VOCAB.index("<bos>"), VOCAB.index(".")
        for t, marker in ((bos, 0), (dot, 3)):
            emb[t] = 0.0
            emb[t, [1, 2, marker]] = 1.0
        # Sink head: every query (channel 1) matches the BOS key (channel 0) strongly.
        model.blocks[0].attn.W_Q[0, 1, 0] = 10.0
        model.blocks[0].attn.W_K[0, 0, 0] = 10.0
        # Step-up: layer 1's MLP squares the trigger into the spike channel.
        x2 = 1.0 / (3 / 16) ** 0.5  # normalized trigger coordinate of BOS and "."
        mlp1 = model.blocks[1].mlp
        mlp1.W_gate[2, 0] = 1.0
        mlp1.W_in[2, 0] = 1.0
        mlp1.W_out[0, SPIKE_CHANNEL] = SPIKE / (torch.nn.functional.silu(torch.tensor(x2)) * x2)
        # Step-down: layer 2's MLP reads the spike channel and writes its negative.
        x7 = SPIKE / ((3 + SPIKE**2) / 16) ** 0.5
        mlp2 = model.blocks[2].mlp
        mlp2.W_gate[SPIKE_CHANNEL, 0] = 1.0
        mlp2.W_in[SPIKE_CHANNEL, 0] = 1.0
        mlp2.W_out[0, SPIKE_CHANNEL] = -SPIKE / (torch.nn.functional.silu(torch.tensor(x7)) * x7)
    return model


UNIFORM_HEAD = (0, 1)
"""Layer 0's other head: its query and key weights are zero, so it attends uniformly."""


def planted_with_values(seed: int = 0) -> HookedTransformer:
    """The planted model whose layer-0 heads copy channel 4 (zero on BOS and ".") into 5 and 6.

    The sink head (0, 0) then writes almost nothing (it attends to BOS, whose value is 0) while
    the uniform head (0, 1) writes the mean channel-4 value of the tokens it sees.
    """
    model = planted_model(seed)
    attn = model.blocks[0].attn
    with torch.no_grad():
        for head, out in ((0, 5), (1, 6)):
            attn.W_V[head, 4, 0] = 1.0
            attn.W_O[head, 0, out] = 1.0
    return model


def sentences(n: int, seed: int = 0, min_words: int = 14, max_words: int = 30) -> list[str]:
    """Seeded random texts of ordinary words with a few "." delimiters."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=gen))
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=gen)]
        for i in torch.randint(2, length, (2,), generator=gen).tolist():
            words[i] = "."
        out.append(" ".join(words))
    return out


def uniform_alpha0(lengths: list[int]) -> float:
    """Pooled first-token score of a head that attends uniformly: Σ_texts H_T / Σ_texts T."""
    return sum(sum(1 / (i + 1) for i in range(t)) for t in lengths) / sum(lengths)


KEY_SINK_HEAD = (0, 1)
"""The head of :func:`planted_key_sink` and :func:`planted_late_sink` (layer 0's second head)."""
_POSITION_CHANNEL = 15
"""A noise channel the positional builders clear and use as a position feature."""


def _positional_head(model: HookedTransformer, query: int, key: int) -> None:
    """Point head KEY_SINK_HEAD's query at channel `query` and its key at channel `key`."""
    layer, head = KEY_SINK_HEAD
    attn = model.blocks[layer].attn
    attn.W_Q[head, query, 0] = 10.0
    attn.W_K[head, key, 0] = 10.0


def planted_key_sink(key_position: int = 3, n_ctx: int = 64) -> HookedTransformer:
    """The planted model, plus a head (0, 1) that sinks on relative position `key_position`.

    Channel 15 carries no noise and a learned position feature at `key_position` only; head
    (0, 1) queries with channel 1 (every token) and keys on channel 15, so every query that can
    see key `key_position` puts (almost) all its attention there, and earlier queries attend
    uniformly. Its first-token score stays low; under Eq. 28 it is a sink head in every
    sequence with ⌊T/2⌋ > key_position.
    """
    model = planted_model(n_ctx=n_ctx, positional="standard")
    with torch.no_grad():
        model.embed.W_E[:, _POSITION_CHANNEL] = 0.0
        model.pos_embed.W_pos[key_position, _POSITION_CHANNEL] = 1.0
        _positional_head(model, query=1, key=_POSITION_CHANNEL)
    return model


def planted_late_sink(from_position: int = 64, n_ctx: int = 128) -> HookedTransformer:
    """The planted model, plus a head (0, 1) that sinks on the first token only from late queries.

    Channel 15 carries no noise and a position feature at every position >= `from_position`;
    head (0, 1) queries with it and keys on the BOS marker, so queries before `from_position`
    attend uniformly and later ones put (almost) all their attention on the first token.
    """
    model = planted_model(n_ctx=n_ctx, positional="standard")
    with torch.no_grad():
        model.embed.W_E[:, _POSITION_CHANNEL] = 0.0
        model.pos_embed.W_pos[from_position:, _POSITION_CHANNEL] = 1.0
        _positional_head(model, query=_POSITION_CHANNEL, key=0)
    return model


def planted_steps(
    writes: list[float], bos_only: tuple[int, ...] = (), noise: float = 0.05, n_ctx: int = 64
) -> HookedTransformer:
    """A spike built block by block: layer l's MLP adds `writes[l]` to channel 7 at spike tokens.

    Spike tokens are BOS and "." (trigger channel 2), or BOS only (marker channel 0) for the
    layers in `bos_only`. Attention writes nothing. Each MLP's output weight is solved from
    the BOS residual it reads, so the writes are exact at BOS (and at "." while every earlier
    write reached it too). Ordinary tokens carry small noise (`noise`), so every layer's
    massive cut is the absolute 100.
    """
    n_layers = len(writes)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=16,
        n_heads=N_HEADS,
        d_head=4,
        d_mlp=8,
        d_vocab=len(VOCAB),
        n_ctx=n_ctx,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        default_prepend_bos=True,
        model_name="planted-steps",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer())
    gen = torch.Generator().manual_seed(0)
    silu = torch.nn.functional.silu
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.fill_(1.0)
        emb = model.embed.W_E
        noise_channels = [4, 5, 6, *range(8, 16)]
        emb[:, 1] = 1.0
        emb[:, noise_channels] = noise * torch.randn(len(VOCAB), len(noise_channels), generator=gen)
        bos, dot = VOCAB.index("<bos>"), VOCAB.index(".")
        for t, marker in ((bos, 0), (dot, 3)):
            emb[t] = 0.0
            emb[t, [1, 2, marker]] = 1.0
        at_bos = 0.0  # channel 7 of the BOS residual before the current layer
        for layer, write in enumerate(writes):
            if write == 0:
                continue
            trigger = 0 if layer in bos_only else 2
            x = 1.0 / ((3 + at_bos**2) / 16 + cfg.eps) ** 0.5  # normalized trigger at BOS
            mlp = model.blocks[layer].mlp
            mlp.W_gate[trigger, 0] = 1.0
            mlp.W_in[trigger, 0] = 1.0
            mlp.W_out[0, SPIKE_CHANNEL] = write / float(silu(torch.tensor(x)) * x)
            at_bos += write
    return model


_LOCAL_CHANNELS = (13, 14)
"""Noise channels :func:`planted_local_sink` clears for a rotating position feature."""


def planted_local_sink(theta: float = 0.049, n_ctx: int = 64, seed: int = 0) -> HookedTransformer:
    """The planted model whose sink head (0, 0) is also local, and whose heads both write.

    Channels 13–14 carry (cos θp, sin θp) at position p and no noise; the sink head adds a
    query·key term on them, so the score of key j at query i gains c·cos θ(i − j) and its
    non-sink attention falls off with distance. Its BOS term is weakened to about 90 % of the
    attention, as in real sink heads. Both layer-0 heads copy channel 4 (as in
    :func:`planted_with_values`) and a seeded unembedding reads channels 5–6, so restricting
    either head can change the loss; the other head (0, 1) stays uniform.
    """
    model = planted_model(seed=seed, n_ctx=n_ctx)
    gen = torch.Generator().manual_seed(seed + 1)
    pos = torch.arange(n_ctx, dtype=torch.float32)
    attn = model.blocks[0].attn
    with torch.no_grad():
        a, b = _LOCAL_CHANNELS
        model.embed.W_E[:, list(_LOCAL_CHANNELS)] = 0.0
        model.pos_embed.W_pos[:, a] = torch.cos(theta * pos)
        model.pos_embed.W_pos[:, b] = torch.sin(theta * pos)
        model.pos_embed.W_pos[0, [a, b]] = 0.0  # the first token's key has no local term
        attn.W_Q[0, 1, 0] = attn.W_K[0, 0, 0] = 3.0
        for dim, channel in ((1, a), (2, b)):
            attn.W_Q[0, channel, dim] = attn.W_K[0, channel, dim] = 2.9
        for head, out in ((0, 5), (1, 6)):
            attn.W_V[head, 4, 0] = 1.0
            attn.W_O[head, 0, out] = 1.0
        model.unembed.W_U[[5, 6]] = torch.randn(2, len(VOCAB), generator=gen)
    return model
