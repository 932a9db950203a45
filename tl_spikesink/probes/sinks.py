"""Attention sinks: which heads park attention on which tokens.

Two head-level sink numbers come out of one forward pass per batch, from
`blocks.L.attn.hook_pattern`; ε is `ScanConfig.epsilon` (0.3).

**Sink ratio** (:attr:`SinkStats.sink_ratio`), the seed paper's headline number (Sun, Canziani,
LeCun & Zhu 2026, Appendix A, Eq. 27–28). For each sequence of n real tokens the scan reads, let
T = min(n, `sink_probe_len`) (64) and α_k = (1/T) Σ_{t<T} A[t, k] over the first T queries, with
query and key positions counted from the sequence's first real token. A head is a sink head *in
that sequence* when max over k < ⌊T/2⌋ of α_k exceeds ε: any key in the first half counts, not
only the first token. s = the share of the L·H heads that are; the sink ratio is the mean of s
over the sequences with T ≥ `sink_min_len` (8), NaN when none is that long. Causal attention
makes the first T queries of a sequence blind to what follows, so reading them inside the longer
sequence gives what the paper gets by feeding the first T tokens alone. Deviations: the paper
feeds C4 texts cut to T = 64 tokens; the scan reads whatever corpus it is given, in chunks of up
to `max_seq_len`, and counts every chunk as one sequence (short ones with T = n); the paper sets
no minimum length (with T < 8 a uniform head already passes ε, H_T / T > 0.3). On a
bidirectional encoder the first T queries also see later keys, so the number is not the paper's.

**First-token sink ratio** (:attr:`SinkStats.first_token_sink_ratio`), Gu et al.'s view pooled
over the corpus. Per (layer, head) and key position k the scan sums the attention key k receives
from the queries that can see it and divides by how many there were, summed over texts before
dividing (token weighted): α_k = Σ_texts Σ_i A_ik / Σ_texts (T − k). The first-token sink score
of a head is α_0 pooled this way (:attr:`SinkStats.scores`); a head whose score exceeds ε is a
first-token *sink head* (:attr:`SinkStats.sink_heads`), and the first-token sink ratio is the
share of heads that are. Unlike Eq. 28 it looks at key 0 only and at every query, and it is one
corpus-wide decision per head rather than a mean over sequences.

Per token, Gu et al.'s Sink^ε_k is the share of (layer, head) pairs with α_k > ε in that text; a
token is a *sink token* when that share reaches `sink_token_share`. Keys seen by fewer than
`min_queries` queries are not judged (the last token attends to itself and would look like a sink).

Positions count from the first real token, so left and right padding give the same numbers;
pattern rows that sum below 1 (learned sink logits) are used as they are, and their mean mass is
reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float

import tl_spikesink.probes.kernels as kernels
from tl_spikesink.anatomy import hook_name
from tl_spikesink.probes.engine import Probe, Step
from tl_spikesink.probes.reducers import Buffers, TokenShares, TopEntries, check_same
from tl_spikesink.results import Result
from tl_spikesink.tokens import TokenRef, is_delimiter

_META = ("text_index", "start", "position", "token_id")


@dataclass(frozen=True)
class SinkToken:
    """A token that many heads use as a sink in its text."""

    token: TokenRef
    token_id: int
    text: str
    share: float
    """Share of (layer, head) pairs whose α for this token exceeds ε."""

    @property
    def is_delimiter(self) -> bool:
        """Whether the token is punctuation or whitespace."""
        return is_delimiter(self.text)


@dataclass(frozen=True, repr=False)
class SinkStats(TokenShares, Result):
    """Attention-sink statistics of one scan; merge two to get the scan of both corpora."""

    n_layers: int
    n_heads: int
    epsilon: float
    sink_token_share: float
    alpha_sum: Float[torch.Tensor, "layer head key_pos"]
    """Σ over texts and queries of the attention each key position receives."""
    alpha_count: Float[torch.Tensor, " key_pos"]
    """Σ over texts of the number of queries that see each key position (T − k)."""
    mass_sum: Float[torch.Tensor, "layer head"]
    """Σ over texts and queries of each pattern row's total (1 unless sink logits are learned)."""
    distance_sum: Float[torch.Tensor, "layer head"]
    """Σ over texts and queries of the query's attention distance Σ_j A_ij (i − j)."""
    distance_nosink_sum: Float[torch.Tensor, "layer head"]
    """Σ over queries of the attention distance with the first-token key removed (renormalized)."""
    distance_nosink_count: Float[torch.Tensor, "layer head"]
    """Queries counted in `distance_nosink_sum` (those with another key to attend to)."""
    candidates: TopEntries
    probe_len: int
    """Eq. 27's T is min(n, probe_len): only a sequence's first `probe_len` queries are read."""
    min_len: int
    """Sequences with T below this are left out of the Eq. 28 sink ratio."""
    sink_head_count: Float[torch.Tensor, "layer head"]
    """Number of counted sequences in which each head was an Eq. 28 sink head."""
    n_ratio_sequences: int
    """Sequences counted in the Eq. 28 sink ratio (those with T >= `min_len`)."""
    token_strings: dict[int, str] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Query tokens seen (every real token is one)."""
        return int(self.alpha_count[0]) if self.alpha_count.numel() else 0

    @property
    def alpha(self) -> Float[torch.Tensor, "layer head key_pos"]:
        """Pooled α_k per head and key position (NaN where no text was that long)."""
        return self.alpha_sum / self.alpha_count.where(self.alpha_count > 0, float("nan"))

    @property
    def scores(self) -> Float[torch.Tensor, "layer head"]:
        """First-token sink score of every head: pooled α_0."""
        return self.alpha[:, :, 0]

    @property
    def row_mass(self) -> Float[torch.Tensor, "layer head"]:
        """Mean total attention per query row; below 1 on models with learned sink logits."""
        return self.mass_sum / self.n_tokens

    @property
    def attention_distance(self) -> Float[torch.Tensor, "layer head"]:
        """Mean over query tokens of Σ_j A_ij (i − j): how far back each head looks."""
        return self.distance_sum / self.n_tokens

    @property
    def attention_distance_without_sink(self) -> Float[torch.Tensor, "layer head"]:
        """Attention distance with the first-token key removed and the rest renormalized."""
        return self.distance_nosink_sum / self.distance_nosink_count.clamp(min=1)

    @property
    def sink_heads(self) -> tuple[tuple[int, int], ...]:
        """(layer, head) pairs whose first-token sink score exceeds ε, in model order."""
        return tuple(tuple(x) for x in (self.scores > self.epsilon).nonzero().tolist())

    @property
    def first_token_sink_ratio(self) -> float:
        """Share of all heads whose corpus-pooled first-token score α_0 exceeds ε (Gu et al.)."""
        return float((self.scores > self.epsilon).float().mean())

    @property
    def first_token_sink_ratio_per_layer(self) -> Float[torch.Tensor, " layer"]:
        """Share of each layer's heads whose first-token sink score exceeds ε."""
        return (self.scores > self.epsilon).float().mean(-1)

    @property
    def sink_ratio_per_head(self) -> Float[torch.Tensor, "layer head"]:
        """Share of the counted sequences in which each head is an Eq. 28 sink head (NaN: none).

        Its mean over all heads is :attr:`sink_ratio`, since the mean of the per-sequence shares
        s equals the mean over heads of how often each head is a sink head.
        """
        if not self.n_ratio_sequences:
            return torch.full((self.n_layers, self.n_heads), float("nan"), dtype=torch.float64)
        return self.sink_head_count / self.n_ratio_sequences

    @property
    def sink_ratio_per_layer(self) -> Float[torch.Tensor, " layer"]:
        """The Eq. 28 sink ratio restricted to each layer's heads (mean of s over sequences)."""
        return self.sink_ratio_per_head.mean(-1)

    @property
    def sink_ratio(self) -> float:
        """The paper's sink ratio (Eq. 28): mean over sequences of the share of sink heads.

        A head is a sink head in a sequence when some key k < ⌊T/2⌋ gets α_k > ε from the first
        T = min(n, probe_len) queries; sequences with T < `min_len` are not counted; NaN when no
        sequence was counted. See the module docstring for how it deviates from the paper.
        """
        return float(self.sink_ratio_per_head.mean())

    @property
    def sink_ratio_definition(self) -> str:
        """One line saying what :attr:`sink_ratio` measures, with this scan's parameters."""
        return (
            f"Eq. 28 of Sun et al. 2026: mean over sequences with T >= {self.min_len} of the share "
            f"of heads with max_(k < T/2) alpha_k > {self.epsilon}, alpha_k = (1/T) sum_(t<T) "
            f"A[t, k] over the first T = min(n, {self.probe_len}) queries"
        )

    @property
    def first_token_sink_ratio_definition(self) -> str:
        """One line saying what :attr:`first_token_sink_ratio` measures."""
        return (
            f"share of heads whose first-token score alpha_0 = sum A[i, 0] / sum T, pooled over "
            f"all queries of the corpus, exceeds {self.epsilon} (Gu et al. 2024)"
        )

    @property
    def tokens(self) -> tuple[SinkToken, ...]:
        """Sink tokens, most heads first."""
        keep = self.candidates.keys >= self.sink_token_share
        return tuple(
            SinkToken(TokenRef(t, s, p), tok, self.token_strings.get(tok, f"<{tok}>"), share)
            for (t, s, p, tok), share in zip(
                self.candidates.meta[keep].tolist(),
                self.candidates.keys[keep].tolist(),
                strict=True,
            )
        )

    def shift_texts(self, offset: int) -> SinkStats:
        """The same statistics with text indices moved by `offset` (to merge separate corpora)."""
        return replace(self, candidates=self.candidates.shift_column(0, offset))

    def token_ids(self) -> set[int]:
        """Every token id among the recorded sink-token candidates."""
        return set(self.candidates.meta[:, 3].unique().tolist())

    def merge(self, other: SinkStats) -> SinkStats:
        """The statistics of both scans' corpora together."""
        check_same(
            self,
            other,
            ("n_layers", "n_heads", "epsilon", "sink_token_share", "probe_len", "min_len"),
        )
        width = max(self.alpha_count.numel(), other.alpha_count.numel())
        return SinkStats(
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            epsilon=self.epsilon,
            sink_token_share=self.sink_token_share,
            alpha_sum=_pad_last(self.alpha_sum, width) + _pad_last(other.alpha_sum, width),
            alpha_count=_pad_last(self.alpha_count, width) + _pad_last(other.alpha_count, width),
            mass_sum=self.mass_sum + other.mass_sum,
            distance_sum=self.distance_sum + other.distance_sum,
            distance_nosink_sum=self.distance_nosink_sum + other.distance_nosink_sum,
            distance_nosink_count=self.distance_nosink_count + other.distance_nosink_count,
            candidates=self.candidates.merge(other.candidates),
            probe_len=self.probe_len,
            min_len=self.min_len,
            # Counts of whole sequences: integers in float64, so the sum is exact in any order.
            sink_head_count=self.sink_head_count + other.sink_head_count,
            n_ratio_sequences=self.n_ratio_sequences + other.n_ratio_sequences,
            token_strings={**self.token_strings, **other.token_strings},
        )


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


class SinkProbe(Probe):
    """Read-only hooks on `attn.hook_pattern` that reduce each batch into :class:`SinkStats`."""

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        epsilon: float,
        sink_token_share: float,
        min_queries: int,
        top_k: int,
        max_candidates: int,
        probe_len: int = 64,
        min_len: int = 8,
        causal: bool = False,
    ):
        self.n_layers, self.n_heads = n_layers, n_heads
        self.causal = causal
        """The model's attention is causal: the kernel skips the pattern past each query."""
        self.probe_len, self.min_len = probe_len, min_len
        self.sink_head_count = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.n_ratio_sequences = 0
        self.epsilon, self.sink_token_share, self.min_queries = (
            epsilon,
            sink_token_share,
            min_queries,
        )
        self.alpha_sum = torch.zeros(n_layers, n_heads, 0, dtype=torch.float64)
        self.alpha_count = torch.zeros(0, dtype=torch.float64)
        self.mass_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.distance_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.distance_nosink_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.distance_nosink_count = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        # Keep shares down to just below the cut so `>=` at read time is exact.
        self.candidates = TopEntries.empty(
            len(_META), top_k, sink_token_share - 1e-9, max_candidates
        )
        self.top_k, self.capacity = top_k, max_candidates
        # Each batch's (share, metadata) of eligible tokens, not yet selected: one selection
        # over many batches costs a fraction of one per batch (at batch size 1, most of what
        # end_batch did).
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0
        self.buffers = Buffers()
        self.fused: kernels.SinkKernel | None = None
        """The compiled kernel, bound to this pass's arrays, or None where the torch path runs."""

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook_name, fn) pairs for `model.hooks`."""
        return [(hook_name("pattern", layer), self._hook(layer)) for layer in range(self.n_layers)]

    def start_batch(self, step: Step) -> None:
        """Prepare per-batch alignment (relative key positions) and vote counters."""
        batch, mask = step.batch, step.mask
        device = mask.device
        self.batch = batch
        # Only left padding leaves fully masked (NaN) rows; right padding's pads follow the text.
        self.left_padded = bool((batch.first > 0).any())
        width = batch.tokens.shape[1]
        rel = torch.arange(width, device=device)
        lengths = batch.lengths.to(device)
        self.seen_by = (lengths[:, None] - rel[None, :]).clamp(min=0).double()  # [batch, key_pos]
        self.mask = mask.float()
        # Column of each relative key position in the padded batch (left padding shifts it).
        self.align = (batch.first.to(device)[:, None] + rel[None, :]).clamp(max=width - 1)
        self.votes = torch.zeros(len(batch.lengths), width, device=device)
        self.seen: dict[int, tuple[torch.Tensor, ...]] = {}
        # Position of every column relative to its sequence's first real token (negative: pad).
        self.rel_pos = (rel[None, :] - batch.first.to(device)[:, None]).float()  # [batch, pos]
        self.key_pos = self.rel_pos.clamp(min=0)
        self.first_col = batch.first.to(device)
        self.eligible = self.seen_by >= self.min_queries
        self._start_ratio(lengths, rel)
        self._grow(width)
        self.alpha_count[:width] += self.seen_by.sum(0).cpu()
        # What every hook of the pass multiplies its pattern by, shaped once here: at batch 1 a
        # hook's handful of view and expand calls cost as much as its arithmetic.
        # Row 0 weights every real query (the attention each key gets), row 1 Eq. 27's first T.
        self.query_weights = torch.stack([self.mask, self.ratio_queries], 1)[:, None]
        self.key_weights = self.key_pos[:, :, None] if self.left_padded else self.key_pos[0]
        if self.left_padded:  # right padding reads the first token at column 0, no gather
            b = len(batch.lengths)
            self.first_index = self.first_col[:, None, None, None].expand(b, self.n_heads, width, 1)
        self.fused = None
        if not self.left_padded and kernels.available(mask):
            self._start_fused()

    def _start_fused(self) -> None:
        # What the kernel reads of this batch, and the running sums it adds to in place.
        w = self.ratio_width
        ratio_t = torch.where(self.ratio_rows, self.ratio_t, 0).float()
        batch = (
            self.query_weights[:, 0].contiguous(),
            self.key_weights.contiguous(),
            self.seen_by,
            self.eligible,
            ratio_t,
            self.ratio_keys[:, :w].contiguous(),
            self.rel_pos,
        )
        sums = (
            self.alpha_sum,
            self.mass_sum,
            self.votes,
            self.sink_head_count,
            self.distance_sum,
            self.distance_nosink_sum,
            self.distance_nosink_count,
        )
        self.fused = kernels.SinkKernel(
            tuple(t.numpy() for t in batch),
            self.epsilon,
            self.causal,
            tuple(t.numpy() for t in sums),
        )

    def _start_ratio(self, lengths: torch.Tensor, rel: torch.Tensor) -> None:
        # Eq. 27: each sequence's first T queries, as weights over the padded query columns, and
        # the keys k < T // 2 it may sink on, at relative positions (gathered through `align`).
        t = lengths.clamp(max=self.probe_len)
        first = self.first_col
        q_rel = rel[None, :] - first[:, None]
        self.ratio_t = t
        self.ratio_rows = t >= self.min_len
        self.ratio_queries = ((q_rel >= 0) & (q_rel < t[:, None])).float()
        self.ratio_keys = rel[None, :] < (t // 2)[:, None]
        # No query or key the ratio reads lies past column first + T: slice the pattern there.
        self.ratio_width = int((first + t).max()) if len(t) else 0

    def _grow(self, width: int) -> None:
        if width > self.alpha_count.numel():
            self.alpha_sum = _pad_last(self.alpha_sum, width)
            self.alpha_count = _pad_last(self.alpha_count, width)

    def _hook(self, layer: int) -> Callable:
        def hook(pattern: Float[torch.Tensor, "batch head query_pos key_pos"], hook: Any) -> None:
            if self.fused is None:
                self._reduce(layer, pattern.detach())
            else:
                self.fused(pattern, layer)

        return hook

    def _reduce(self, layer: int, pattern: torch.Tensor) -> None:
        # Only the work that needs the [batch, head, query, key] pattern happens here; what is
        # left is small, kept per layer and reduced for all layers at once in end_batch (at
        # batch size 1, per-hook bookkeeping would cost more than these products).
        # Fully masked rows (pad queries under left padding) may hold NaN; they carry no weight.
        p = pattern.float()
        b, h, q, k = p.shape
        if self.left_padded:
            p = torch.nan_to_num(p, 0.0, out=self.buffers("p", p.shape, p.dtype, p.device))
        # Attention each key gets from every real query, and from Eq. 27's first T: two rows
        # times the pattern in one product. Not einsum: on CPU einsum lowers this to a
        # matrix-vector bmm about 20x slower than the broadcast matmul.
        both = self.query_weights @ p  # [batch, head, 2, key]
        received, ratio = both[:, :, 0], both[:, :, 1, : self.ratio_width]
        # Σ_j A_ij (i − j) = i·Σ_j A_ij − Σ_j A_ij·j: one matrix-vector product per sequence.
        mass = p.sum(-1)
        if self.left_padded:
            key_pos = torch.bmm(p.reshape(b, h * q, k), self.key_weights).view(b, h, q)
            a_first = p.gather(-1, self.first_index).squeeze(-1)
        else:  # every sequence starts at column 0: one product for the whole batch
            key_pos = (p.reshape(-1, k) @ self.key_weights).view(b, h, q)
            a_first = p[..., 0].clone()  # a view would keep the whole pattern alive
        self.seen[layer] = (received, ratio, mass, key_pos, a_first)

    def _reduce_layers(self) -> None:
        """Fold every layer the last forward pass showed into the running sums, all at once."""
        if self.fused is not None or not self.seen:  # the kernel has added its layers already
            return
        layers = torch.tensor(sorted(self.seen))
        received, ratio, mass, key_pos, a_first = (
            torch.stack(parts) for parts in zip(*(self.seen[int(i)] for i in layers), strict=True)
        )
        self.seen = {}
        n, b, h, k = received.shape
        if self.left_padded:  # otherwise relative key positions are the columns already
            received = received.gather(-1, self.align[None, :, None, :].expand(n, b, h, k))
        received = received * (self.seen_by > 0)[None, :, None, :]
        self.alpha_sum[layers, :, :k] += received.sum(1).double().cpu()
        self.mass_sum[layers] += received.sum((1, 3)).double().cpu()
        alpha = received / self.seen_by.clamp(min=1)[None, :, None, :].float()
        self.votes += ((alpha > self.epsilon) & self.eligible[None, :, None, :]).sum((0, 2))
        self._ratio(layers, ratio)
        self._distance(layers, mass, key_pos, a_first)

    def _ratio(self, layers: torch.Tensor, received: torch.Tensor) -> None:
        w = self.ratio_width
        if w == 0:
            return
        n, b, h, _ = received.shape
        if self.left_padded:
            cols = self.align[:, :w].clamp(max=w - 1)
            received = received.gather(-1, cols[None, :, None, :].expand(n, b, h, w))
        alpha = received / self.ratio_t[None, :, None, None].clamp(min=1).float()
        best = alpha.masked_fill(~self.ratio_keys[None, :, None, :w], -1.0).amax(-1)
        sink = (best > self.epsilon) & self.ratio_rows[None, :, None]
        self.sink_head_count[layers] += sink.sum(1).double().cpu()

    def _distance(
        self, layers: torch.Tensor, mass: torch.Tensor, key_pos: torch.Tensor, a_first: torch.Tensor
    ) -> None:
        q_rel = self.rel_pos[None, :, None, :]  # [1, batch, 1, query]
        real = self.mask[None, :, None, :]
        dist = q_rel * mass - key_pos
        self.distance_sum[layers] += (dist * real).sum((1, 3)).double().cpu()
        rest = mass - a_first
        ok = (real > 0) & (q_rel >= 1) & (rest > 1e-6)
        nosink = (dist - a_first * q_rel) / rest.clamp(min=1e-6)
        self.distance_nosink_sum[layers] += torch.where(ok, nosink, 0.0).sum((1, 3)).double().cpu()
        self.distance_nosink_count[layers] += ok.sum((1, 3)).double().cpu()

    def end_batch(self, step: Step, logits: torch.Tensor | None = None) -> None:
        """Reduce the pass's layers; turn this batch's per-token head votes into sink candidates."""
        self._reduce_layers()
        # Counted here, not in start_batch: a pass skipped for this batch saw no pattern.
        self.n_ratio_sequences += int(self.ratio_rows.sum())
        share = (self.votes / (self.n_layers * self.n_heads)).cpu()
        batch = self.batch
        b, k = share.shape
        rows = torch.arange(b)[:, None].expand(b, k)
        rel = torch.arange(k)[None, :].expand(b, k)
        cols = self.align.cpu()
        meta = torch.stack(
            [
                batch.text_index[rows],
                batch.start[rows],
                rel,
                batch.tokens.gather(1, cols),
            ],
            dim=-1,
        ).reshape(-1, len(_META))
        eligible = self.eligible.cpu().flatten()
        self.pending.append((share.flatten()[eligible], meta[eligible]))
        self.n_pending += int(eligible.sum())
        if self.n_pending > 4 * self.capacity:  # bounds what waits, whatever the corpus length
            self._fold()

    def _fold(self) -> None:
        """Select the candidates from those kept and those waiting (the same as batch by batch)."""
        if not self.pending:
            return
        keys = torch.cat([self.candidates.keys, *(k for k, _ in self.pending)])
        meta = torch.cat([self.candidates.meta, *(m for _, m in self.pending)])
        self.pending, self.n_pending = [], 0
        new = TopEntries.select(
            keys, keys.clone(), meta, self.top_k, self.candidates.threshold, self.capacity
        )
        self.candidates = replace(new, truncated=new.truncated or self.candidates.truncated)

    def result(self) -> SinkStats:
        """Freeze what was seen into :class:`SinkStats` (its fields are this probe's sums)."""
        self._fold()
        return self.freeze(SinkStats, sink_head_count=self.sink_head_count.clone())
