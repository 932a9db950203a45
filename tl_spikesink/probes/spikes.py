"""Massive activations: where they are, which channels carry them, which blocks make and undo them.

A massive activation (Sun et al. 2024) is a residual-stream value with |x| > `abs_threshold` (100)
and |x| > `rel_threshold` (1000) times the median |x| of its layer. The scan streams every batch
through read-only hooks on `hook_resid_post`, `hook_attn_out` and `hook_mlp_out` and keeps, per
(site, layer), a log-histogram of |x| (for medians) and the largest entries with their location.

Lifecycle: a *step-up* block is one whose attention or MLP output writes at least half of a spike
(same sign, at the same token and channel) into the residual stream, unless the residual carried a
spike of the opposite sign there before the block (overshooting a cancellation is a step-down);
a *step-down* block is one whose output removes at least half of a spike the residual carried
in. The layers between form the plateau. Blocks are TransformerLens (layer, component) pairs;
the seed paper (Sun, Canziani, LeCun & Zhu 2026) numbers the same sublayers 1 .. 2L, see
:func:`tl_spikesink.anatomy.paper_block`.

Spike (:attr:`SpikeStats.spike`): the absolute magnitude the paper's tables report in their
"Spike" column, here the largest |x| at `hook_resid_post` in the spike channels over all layers.
The paper gives no threshold or channel rule for it; this one reads only the channels that carry
a massive activation, so it is NaN for a scan without any (the paper would still print a number,
e.g. 92 for its QK-norm model).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int

import tl_spikesink.probes.kernels as kernels
from tl_spikesink.anatomy import Site, hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import Probe, Step
from tl_spikesink.probes.reducers import (
    BIN_SHIFT,
    N_BINS,
    Buffers,
    Stage,
    TokenShares,
    TopEntries,
    abs_bits,
    bin_edges,
    check_same,
    histogram_quantile,
    select_groups,
)
from tl_spikesink.results import Result
from tl_spikesink.tokens import TokenRef, is_delimiter

if TYPE_CHECKING:
    from tl_spikesink.probes.kurtosis import KurtosisProbe

_META = ("text_index", "start", "position", "channel", "token_id")
_STEP_SHARE = 0.5
"""A block steps a spike up (down) when its output carries at least this share of it."""
SPIKE_DEFINITION = (
    "largest |x| at hook_resid_post in the spike channels, over all layers and tokens "
    "(the 'Spike' column of Sun et al. 2026); null without a massive activation"
)
"""What :attr:`SpikeStats.spike` measures, as reports print it."""


@dataclass(frozen=True)
class Activation:
    """One recorded activation value."""

    site: Site
    layer: int
    token: TokenRef
    channel: int
    token_id: int
    value: float


@dataclass(frozen=True)
class SpikeToken:
    """A token that carries a massive activation in at least one layer."""

    token: TokenRef
    token_id: int
    text: str
    max_value: float
    """Signed value of its largest massive activation."""
    channels: tuple[int, ...]
    layers: tuple[int, ...]

    @property
    def is_delimiter(self) -> bool:
        """Whether the token is punctuation or whitespace."""
        return is_delimiter(self.text)


@dataclass(frozen=True, repr=False)
class SpikeStats(TokenShares, Result):
    """Massive-activation statistics of one scan; merge two to get the scan of both corpora."""

    sites: tuple[Site, ...]
    n_layers: int
    abs_threshold: float
    rel_threshold: float
    histograms: Int[torch.Tensor, "site layer bins"]
    entries: dict[Site, tuple[TopEntries, ...]]
    token_strings: dict[int, str] = field(default_factory=dict)

    def median(self, site: Site = "resid_post") -> Float[torch.Tensor, " layer"]:
        """Median |x| of each layer at `site`, from the streaming histogram (within ~5 %)."""
        return histogram_quantile(self.histograms[self.sites.index(site)], 0.5)

    def top(self, site: Site = "resid_post", n: int = 3) -> Float[torch.Tensor, "layer n"]:
        """The `n` largest |x| of each layer at `site`, descending."""
        # Fewer than n entries means the rest were exact zeros.
        out = torch.zeros(self.n_layers, n)
        for layer, e in enumerate(self.entries[site]):
            m = min(n, len(e))
            out[layer, :m] = e.keys[:m]
        return out

    def top_activations(
        self, site: Site = "resid_post", layer: int = 0, n: int = 10
    ) -> list[Activation]:
        """The `n` largest activations of one layer at `site`, with where they are."""
        return self._records(site, layer, self.entries[site][layer], n)

    def _records(
        self, site: Site, layer: int, e: TopEntries, n: int | None = None
    ) -> list[Activation]:
        rows = e.meta[:n].tolist()
        return [
            Activation(site, layer, TokenRef(t, s, p), c, tok, v)
            for (t, s, p, c, tok), v in zip(rows, e.values[:n].tolist(), strict=True)
        ]

    @cached_property
    def massive(self) -> tuple[Activation, ...]:
        """Every massive activation of the residual stream (`hook_resid_post`), layer by layer."""
        found: list[Activation] = []
        for layer, e in enumerate(self.entries["resid_post"]):
            found += self._records("resid_post", layer, _take(e, e.keys > self.cut[layer]))
        return tuple(found)

    @cached_property
    def cut(self) -> Float[torch.Tensor, " layer"]:
        """The massive-activation threshold of each layer: max(abs, rel x median)."""
        return (self.rel_threshold * self.median("resid_post")).clamp(min=self.abs_threshold)

    @property
    def truncated(self) -> bool:
        """True if `max_candidates` may have hidden an entry the analyses need; raise it then.

        Candidates are kept largest first, so a full list only matters when its smallest entry
        is still above what counts: the layer's massive cut in the residual stream, and half the
        smallest spike in the block outputs (the step-up / step-down rule).
        """
        smallest_spike = min((abs(a.value) for a in self.massive), default=float("inf"))
        needs = {"resid_post": self.cut.tolist()}
        for site in self.sites:
            needs.setdefault(site, [_STEP_SHARE * smallest_spike] * self.n_layers)
        return any(
            e.truncated and len(e) and float(e.keys[-1]) > need
            for site, entries in self.entries.items()
            for e, need in zip(entries, needs[site], strict=True)
        )

    @cached_property
    def tokens(self) -> tuple[SpikeToken, ...]:
        """Spike tokens, largest first."""
        by_token: dict[TokenRef, list[Activation]] = defaultdict(list)
        for a in self.massive:
            by_token[a.token].append(a)
        out = []
        for ref, acts in by_token.items():
            peak = max(acts, key=lambda a: abs(a.value))
            out.append(
                SpikeToken(
                    token=ref,
                    token_id=peak.token_id,
                    text=self.token_strings.get(peak.token_id, f"<{peak.token_id}>"),
                    max_value=peak.value,
                    channels=tuple(sorted({a.channel for a in acts})),
                    layers=tuple(sorted({a.layer for a in acts})),
                )
            )
        return tuple(sorted(out, key=lambda t: (-abs(t.max_value), t.token)))

    @cached_property
    def channels(self) -> tuple[int, ...]:
        """Spike channels, the one carried by most spike tokens first."""
        counts = Counter(c for t in self.tokens for c in t.channels)
        return tuple(c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    @property
    def massive_layers(self) -> tuple[int, ...]:
        """Layers whose residual stream holds at least one massive activation."""
        return tuple(sorted({a.layer for a in self.massive}))

    @cached_property
    def _steps(self) -> dict[str, dict[tuple[int, str], list[float]]]:
        """Per kind and (layer, component), |x| of each spike the block stepped up or down.

        A step-up is measured after the block (the residual value it helped write), a step-down
        before it (the value it cancels).
        """
        steps: dict[str, dict[tuple[int, str], list[float]]] = {
            "step_up": defaultdict(list),
            "step_down": defaultdict(list),
        }
        outputs = [s for s in ("attn_out", "mlp_out") if s in self.sites]
        if not outputs:
            return steps
        resid = {(a.layer, a.token, a.channel): a.value for a in self.massive}
        written: dict[tuple[int, TokenRef, int], list[tuple[str, float]]] = defaultdict(list)
        for site in outputs:
            for layer, e in enumerate(self.entries[site]):
                for a in self._records(site, layer, e):
                    written[(layer, a.token, a.channel)].append(
                        (site.removesuffix("_out"), a.value)
                    )
        for (layer, ref, ch), outs in written.items():
            after = resid.get((layer, ref, ch))
            before = resid.get((layer - 1, ref, ch))
            for component, value in outs:
                # A block that flips a spike's sign cancels it: a step-down, not a new origin.
                flipped = before is not None and after is not None and before * after < 0
                if (
                    after is not None
                    and value * after > 0
                    and abs(value) >= _STEP_SHARE * abs(after)
                    and not flipped
                ):
                    steps["step_up"][(layer, component)].append(abs(after))
                if (
                    before is not None
                    and value * before < 0
                    and abs(value) >= _STEP_SHARE * abs(before)
                ):
                    steps["step_down"][(layer, component)].append(abs(before))
        return steps

    @cached_property
    def lifecycle(self) -> dict[str, Counter]:
        """Counts of step-up and step-down events per (layer, component), over spike entries.

        Keys `"step_up"` and `"step_down"` map `(layer, "attn" | "mlp")` to the number of
        (token, channel) spikes that component created or cancelled.
        """
        return {
            kind: Counter({block: len(v) for block, v in sorted(by_block.items())})
            for kind, by_block in self._steps.items()
        }

    @cached_property
    def lifecycle_peaks(self) -> dict[str, dict[tuple[int, str], float]]:
        """The largest spike each step-up / step-down block handled, keyed like :attr:`lifecycle`.

        For a step-up block: the largest |x| at `hook_resid_post` of its layer among the spikes
        it created; for a step-down block: the largest |x| it cancelled (before the block).
        """
        return {
            kind: {block: max(v) for block, v in sorted(by_block.items())}
            for kind, by_block in self._steps.items()
        }

    @cached_property
    def spike(self) -> float:
        """The paper's "Spike": the largest |x| at `hook_resid_post` in the spike channels.

        Taken over every layer and token of the scan, in :attr:`channels`; NaN when the scan
        found no massive activation (so there are no spike channels). Each layer keeps its
        largest entries first, so the value is exact unless :attr:`truncated` says otherwise.
        """
        if not self.channels:
            return float("nan")
        channels = torch.tensor(self.channels)
        best = float("nan")
        for e in self.entries["resid_post"]:
            keep = torch.isin(e.meta[:, 3], channels)
            if bool(keep.any()):
                top = float(e.keys[keep].max())
                best = top if best != best else max(best, top)
        return best

    @property
    def step_up_layers(self) -> tuple[int, ...]:
        """Blocks whose output creates a spike, in depth order."""
        return tuple(sorted({layer for layer, _ in self.lifecycle["step_up"]}))

    @property
    def step_down_layers(self) -> tuple[int, ...]:
        """Blocks whose output cancels a spike, in depth order."""
        return tuple(sorted({layer for layer, _ in self.lifecycle["step_down"]}))

    def merge(self, other: SpikeStats) -> SpikeStats:
        """The statistics of both scans' corpora together."""
        check_same(self, other, ("sites", "n_layers", "abs_threshold", "rel_threshold"))
        return SpikeStats(
            sites=self.sites,
            n_layers=self.n_layers,
            abs_threshold=self.abs_threshold,
            rel_threshold=self.rel_threshold,
            histograms=self.histograms + other.histograms,
            entries={
                s: tuple(a.merge(b) for a, b in zip(self.entries[s], other.entries[s], strict=True))
                for s in self.sites
            },
            token_strings={**self.token_strings, **other.token_strings},
        )

    def shift_texts(self, offset: int) -> SpikeStats:
        """The same statistics with text indices moved by `offset` (to merge separate corpora)."""
        return replace(
            self,
            entries={
                s: tuple(e.shift_column(0, offset) for e in v) for s, v in self.entries.items()
            },
        )

    def token_ids(self) -> set[int]:
        """Every token id that appears in a recorded entry (to look up their strings)."""
        ids = [e.meta[:, 4] for entries in self.entries.values() for e in entries]
        return set(torch.cat(ids).unique().tolist()) if ids else set()


def _take(e: TopEntries, keep: torch.Tensor) -> TopEntries:
    return replace(e, keys=e.keys[keep], values=e.values[keep], meta=e.meta[keep])


class SpikeProbe(Probe):
    """Read-only hooks that reduce each batch's activations into :class:`SpikeStats`."""

    def __init__(
        self,
        n_layers: int,
        sites: tuple[Site, ...],
        abs_threshold: float,
        rel_threshold: float,
        top_k: int,
        max_candidates: int,
        kurtosis: KurtosisProbe | None = None,
    ):
        """Reduce `sites` of every layer; with `kurtosis`, read that probe's layers too.

        `kurtosis` is a kurtosis probe of the same pass, read in this probe's
        `hook_resid_post` hooks in the same pass over each activation (one hook a layer
        instead of two: at batch size 1 a hook's call costs as much as its arithmetic); it
        then installs no hooks of its own. Ignored where `sites` has no ``resid_post``.
        """
        self.sites, self.n_layers = sites, n_layers
        self.kurtosis = kurtosis if "resid_post" in sites else None
        if self.kurtosis is not None:
            self.kurtosis.hosted = True
        self.abs_threshold, self.rel_threshold = abs_threshold, rel_threshold
        self.top_k, self.capacity = top_k, max_candidates
        self.hist: torch.Tensor | None = None
        self.entries = {
            s: [
                TopEntries.empty(len(_META), top_k, self._threshold(s), max_candidates)
                for _ in range(n_layers)
            ]
            for s in sites
        }
        # Each (site, layer) is a slot, site-major: its row of the histogram and of `pending`.
        self.n_slots = len(sites) * n_layers
        # Per batch: (keys, values, meta, slot per entry) not yet selected, and per slot
        # whether a batch overflowed `max_candidates`.
        self.pending: list[tuple] = []
        self.n_pending = np.zeros(self.n_slots, np.int64)
        self.overflow = np.zeros(self.n_slots, bool)
        self.found: list[tuple] = []
        self.buffers = Buffers()
        # Keyed by (site index, layer).
        self.stage = Stage(self.buffers, "stage", self.n_slots, self._reduce)
        self.arena = kernels.Arena(self.n_slots)
        self.fused: tuple | None = None
        """The compiled kernel's per-batch arguments, or None where the torch path runs."""
        self.kernel: kernels.SpikeKernel | None = None
        """The compiled kernel bound to them, from the pass's first hook."""
        thresholds = [self._threshold(s) for s in sites for _ in range(n_layers)]
        self.kernel_settings = (
            np.array([kernels.float_bits(t) for t in thresholds], np.int32),
            np.array([top_k, max_candidates, BIN_SHIFT], np.int64),
        )

    def _threshold(self, site: Site) -> float:
        # Block outputs are kept down to half the spike threshold: a step-up block may write only
        # half of a spike that just crosses it.
        return self.abs_threshold if site == "resid_post" else _STEP_SHARE * self.abs_threshold

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook_name, fn) pairs for `model.hooks`.

        On CPU a hook reduces its activation at once, in one compiled pass
        (:mod:`~tl_spikesink.probes.kernels`). Elsewhere, or without numba, it only copies the
        activation into a :class:`Stage`, and one torch reduction covers every staged
        (site, layer), at the latest at the end of the pass.
        """
        return [
            (hook_name(site, layer), self._hook(i, layer))
            for i, site in enumerate(self.sites)
            for layer in range(self.n_layers)
        ]

    def start_batch(self, step: Step) -> None:
        """Remember which positions are real, and what each one is, for the next forward pass."""
        batch = step.batch
        self.mask, self.has_pads = step.mask, step.has_pads
        self.pads = ~step.mask
        # Each flattened position's (text_index, start, position, token_id): one gather per
        # pass instead of five per hook.
        b, t = batch.tokens.shape
        pos = torch.arange(t)[None, :] - batch.first[:, None]
        self.where = torch.stack(
            [
                batch.text_index[:, None].expand(b, t),
                batch.start[:, None].expand(b, t),
                pos,
                batch.tokens,
            ],
            dim=-1,
        ).reshape(b * t, 4).int()
        self.found = []
        self.stage.clear()
        if self.hist is None:
            self.hist = torch.zeros(
                len(self.sites), self.n_layers, N_BINS, dtype=torch.long, device=step.mask.device
            )
        self.fused = None
        if kernels.available(self.hist):
            self.fused = (
                *self.kernel_settings,
                self.pads.flatten().numpy(),
                self.where.numpy(),
                self.hist.view(self.n_slots, N_BINS).numpy(),
            )
        self.kernel = None

    def _bind(self) -> kernels.SpikeKernel:
        # At the pass's first hook, when the kurtosis probe has made this batch's arrays too.
        if self.kurtosis is not None and self.kurtosis.fused is None:
            raise SpikeSinkError(
                "this spike probe reads a kurtosis probe's layers, but that probe has not "
                "started this batch: run both in the same pass (as ScanProbes does)"
            )
        kurtosis = () if self.kurtosis is None else (self.kurtosis.fused,)
        self.kernel = kernels.SpikeKernel(self.fused, self.arena, *kurtosis)
        return self.kernel

    def _hook(self, site_index: int, layer: int) -> Callable:
        slot = site_index * self.n_layers + layer
        kurtosis = self.kurtosis if self.sites[site_index] == "resid_post" else None
        kurtosis_layer = -1 if kurtosis is None else layer

        # As little Python as it takes: at batch 1 a hook's objects are out of cache, and each
        # one costs more than the kernel's pass over the activation (docs/speed.md).
        def hook(act: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            if self.fused is None:
                self.stage.add((site_index, layer), act.detach())
                if kurtosis is not None:
                    kurtosis.read(act, layer)
            else:
                (self.kernel or self._bind())(act, slot, kurtosis_layer)

        return hook

    def _reduce(self, groups: list[tuple[int, int]], x: torch.Tensor) -> None:
        """Reduce staged (site, layer) groups at once: histogram counts and candidate entries."""
        n_groups = len(groups)
        n_tok, d = x.shape[1:]
        device, buf = x.device, self.buffers
        # |x|'s float32 bit pattern is ordered like |x|: as floats the bits are |x| itself (the
        # search below needs no |x| copy), their row maximum is the token maximum, and their
        # high bits are the histogram bin.
        bits = abs_bits(x, out=buf("bits", x.shape, torch.int32, device))
        magnitude = bits.view(torch.float32)
        tok_max = bits.amax(-1).view(torch.float32)  # [group, token]
        if self.has_pads:
            tok_max.masked_fill_(self.pads.flatten()[None], -1.0)

        # The top-k entries lie in the k tokens with the largest maxima, and every entry above the
        # threshold in a token whose maximum is above it: only those rows are searched.
        thresholds = [self._threshold(self.sites[i]) for i, _ in groups]
        threshold = torch.tensor(thresholds, device=device)
        kth = tok_max.topk(min(self.top_k, n_tok), dim=-1).values[:, -1]
        cut = torch.minimum(kth, threshold)  # ties with the k-th go on too
        # Pads (-1) and tokens whose activations are all exactly zero are never searched.
        group_of, rows = ((tok_max >= cut[:, None]) & (tok_max > 0)).nonzero(as_tuple=True)
        flat_rows = group_of * n_tok + rows
        keys = buf("keys", (len(flat_rows), d), torch.float32, device)
        torch.index_select(magnitude.view(-1, d), 0, flat_rows, out=keys)
        above = torch.gt(
            keys, threshold[group_of, None], out=buf("above", keys.shape, torch.bool, device)
        )
        n_above = torch.zeros(n_groups, dtype=torch.long, device=device)
        n_above = n_above.index_add_(0, group_of, above.sum(1)).tolist()
        # Per group: every entry above the threshold (the usual case: what topk(n_above) would
        # keep, ties included, without the sort), or every entry down to the m-th largest:
        # m = top_k where fewer are above (one padded topk for all such groups), m = capacity
        # where more are (rare; a loop).
        under = [g for g, n in enumerate(n_above) if n < self.top_k]
        over = [g for g, n in enumerate(n_above) if n > self.capacity]
        if under or over:
            usual = torch.ones(n_groups, dtype=torch.bool, device=device)
            usual[under + over] = False
            keep = above & usual[group_of, None]
            if under:
                cutoff = self._under_cutoffs(keys, group_of, under, n_groups)
                keep |= (keys >= cutoff[group_of, None]) & (keys > 0)
            r, channel = keep.nonzero(as_tuple=True)
            if over:
                picked = [(r, channel)] + [
                    self._over_entries(keys, group_of, bits[g], g) for g in over
                ]
                r, channel = (torch.cat(c) for c in zip(*picked, strict=True))
                order = torch.sort(group_of[r], stable=True).indices  # grouped again
                r, channel = r[order], channel[order]
        else:
            r, channel = above.nonzero(as_tuple=True)
        entry_keys = keys[r, channel]
        values = x.view(-1, d)[flat_rows[r], channel]  # the sign, from the activation itself

        bits >>= BIN_SHIFT
        if n_groups > 1:  # one bincount for every group: group g counts in bins g·N_BINS + bin
            offsets = torch.arange(n_groups, device=device, dtype=torch.int32) * N_BINS
            bits += offsets[:, None, None]
        counts = torch.bincount(bits.flatten(), minlength=n_groups * N_BINS)
        if self.has_pads:  # take the pads back out: cheaper than masking every entry
            counts -= torch.bincount(
                bits[:, self.pads.flatten()].flatten(), minlength=counts.numel()
            )
        where = torch.tensor(groups, device=device).T
        self.hist.index_put_((where[0], where[1]), counts.view(n_groups, N_BINS), accumulate=True)
        # Where the entries are is worked out for the whole pass at once, in end_batch.
        self.found.append((groups, group_of[r], rows[r], channel, entry_keys, values, n_above))

    def _under_cutoffs(
        self, keys: torch.Tensor, group_of: torch.Tensor, under: list[int], n_groups: int
    ) -> torch.Tensor:
        """The top_k-th largest candidate entry of each group in `under` (+inf elsewhere)."""
        device, d = keys.device, keys.shape[1]
        cutoff = torch.full((n_groups,), float("inf"), device=device)
        is_under = torch.zeros(n_groups, dtype=torch.bool, device=device)
        is_under[under] = True
        mine = is_under[group_of].nonzero()[:, 0]  # rows come sorted by group
        if not len(mine):
            return cutoff
        slot_of = torch.cumsum(is_under, 0) - 1  # group -> its row of the padded table
        g = slot_of[group_of[mine]]
        counts = torch.bincount(g, minlength=len(under))
        start = torch.cumsum(counts, 0) - counts
        width = int(counts.max())
        # Missing rows are -1: below every entry, so a group with fewer than top_k entries keeps
        # every positive one, as topk over just its own would.
        padded = torch.full((len(under), width, d), -1.0, device=device)
        padded[g, torch.arange(len(mine), device=device) - start[g]] = keys[mine]
        m = min(self.top_k, width * d)
        cutoff[under] = padded.view(len(under), -1).topk(m, dim=-1).values[:, -1]
        return cutoff

    def _over_entries(
        self, keys: torch.Tensor, group_of: torch.Tensor, bits: torch.Tensor, g: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, channel) of a group's entries down to its capacity-th largest (ties go on)."""
        mine = (group_of == g).nonzero()[:, 0]
        m = min(self.capacity, mine.numel() * keys.shape[1])
        k = keys[mine]
        pool = k.flatten()
        # topk(capacity) of a large layer costs milliseconds; the histogram says in which bin the
        # m-th largest entry lies, and only entries from there compete.
        counts = torch.bincount(bits.flatten() >> BIN_SHIFT, minlength=N_BINS)
        from_top = counts.flip(0).cumsum(0)
        floor = bin_edges(N_BINS - 1 - torch.searchsorted(from_top, m)).item()
        # Pads are in that histogram: should they crowd the bin, search everything.
        above_floor = pool[pool >= floor]
        pool = above_floor if above_floor.numel() >= m else pool
        # Every entry tied with the cutoff goes on, so the reducer (not topk) breaks ties and the
        # result does not depend on how the corpus was batched. Exact zeros tie by the million
        # and say nothing; they are never kept.
        cutoff = pool.topk(m).values[-1]
        rr, cc = ((k >= cutoff) & (k > 0)).nonzero(as_tuple=True)
        return mine[rr], cc

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        """Reduce what is still staged, locate the pass's entries, queue them for selection."""
        self.stage.flush()
        if self.arena.fill[0]:
            self._add(*self.arena.take())
        if not self.found:
            return
        found, self.found = self.found, []
        # Entries come grouped by flush, and within a flush by group: number the groups of the
        # whole pass and split the entries back by them.
        groups = [g for f in found for g in f[0]]
        offsets = accumulate((len(f[0]) for f in found), initial=0)
        group_of = torch.cat(
            [f[1] + offset for f, offset in zip(found, offsets, strict=False)]
        ).cpu()
        columns = list(zip(*found, strict=True))[2:6]
        token, channel, keys, values = (torch.cat(col).cpu() for col in columns)
        # int32: half the bytes of what the scan keeps per entry (every column fits: text
        # indices, offsets, positions, channels and token ids are far below 2^31).
        meta = torch.cat([self.where[token], channel[:, None].int()], dim=1)[:, [0, 1, 2, 4, 3]]
        slot_of = torch.tensor([i * self.n_layers + layer for i, layer in groups])
        overflow = np.zeros(self.n_slots, bool)
        overflow[slot_of.numpy()] = [n > self.capacity for f in found for n in f[6]]
        self._add(keys, values, meta, slot_of[group_of].int().numpy(), overflow)

    def _add(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        meta: torch.Tensor,
        slots: np.ndarray,
        overflow: np.ndarray,
    ) -> None:
        """Queue one pass's entries (of every slot) for selection."""
        self.pending.append((keys, values, meta, slots))
        self.n_pending += np.bincount(slots, minlength=self.n_slots)
        self.overflow |= overflow
        # Selecting sorts; one selection over many batches keeps the per-batch cost low, and
        # folding a slot once it has 4 x `capacity` entries waiting bounds what waits, whatever
        # the corpus length, at a few times what the result itself holds.
        busy = self.n_pending > 4 * self.capacity
        if busy.any():
            self._fold(busy)
        elif len(self.pending) > 32:
            self._fold()

    def _fold(self, which: np.ndarray | None = None) -> None:
        """Select the entries of the slots in `which` (bool per slot; default every slot).

        Each from what it kept and what waits; the other slots' entries wait on.
        """
        if not self.pending:
            return
        keys, values, meta = (torch.cat(c) for c in list(zip(*self.pending, strict=True))[:3])
        slots = np.concatenate([p[3] for p in self.pending])
        self.pending = []
        which = np.ones(self.n_slots, bool) if which is None else which
        waits = ~which[slots]
        if waits.any():
            rest, take = torch.from_numpy(waits), torch.from_numpy(~waits)
            self.pending = [(keys[rest], values[rest], meta[rest], slots[waits])]
            keys, values, meta, slots = keys[take], values[take], meta[take], slots[~waits]
        folded = np.flatnonzero(which)
        old = [self.entries[self.sites[s // self.n_layers]][s % self.n_layers] for s in folded]
        group = np.full(self.n_slots, -1, np.int32)
        group[folded] = np.arange(len(folded))
        # A slot that holds `capacity` entries keeps none below its smallest: only entries at
        # least that large (ties decide by position) need sorting. Any above the threshold
        # that are dropped here would have been dropped there, and the slot is truncated.
        if any(len(e) >= e.capacity for e in old):
            floor = torch.tensor([float(e.keys[-1]) if len(e) >= e.capacity else -1.0 for e in old])
            threshold = torch.tensor([e.threshold for e in old], dtype=torch.float64)
            g = torch.from_numpy(group[slots]).long()
            keep = keys >= floor[g]
            above = (keys.double() > threshold[g])[~keep].numpy()
            lost = np.bincount(slots[~keep.numpy()], weights=above, minlength=self.n_slots)
            self.overflow |= lost > 0
            keys, values, meta, slots = keys[keep], values[keep], meta[keep], slots[keep.numpy()]
        kept = np.repeat(np.arange(len(folded), dtype=np.int32), [len(e) for e in old])
        new = select_groups(
            torch.cat([e.keys for e in old] + [keys]),
            torch.cat([e.values for e in old] + [values]),
            torch.cat([e.meta for e in old] + [meta]),
            np.concatenate([kept, group[slots]]),
            old,
        )
        for slot, was, now in zip(folded, old, new, strict=True):
            truncated = now.truncated or was.truncated or bool(self.overflow[slot])
            self.entries[self.sites[slot // self.n_layers]][slot % self.n_layers] = replace(
                now, truncated=truncated
            )
        self.n_pending[folded] = 0
        self.overflow[folded] = False

    def result(self, token_strings: dict[int, str]) -> SpikeStats:
        """Freeze what was seen into :class:`SpikeStats`."""
        # Hooks fired outside the engine, with no end_batch after.
        if self.found or self.stage.keys or self.arena.fill[0]:
            self.end_batch(None, None)  # type: ignore[arg-type]
        self._fold()
        hist = (
            self.hist.cpu()
            if self.hist is not None
            else torch.zeros(len(self.sites), self.n_layers, N_BINS, dtype=torch.long)
        )
        return SpikeStats(
            sites=self.sites,
            n_layers=self.n_layers,
            abs_threshold=self.abs_threshold,
            rel_threshold=self.rel_threshold,
            histograms=hist,
            entries={s: tuple(v) for s, v in self.entries.items()},
            token_strings=token_strings,
        )
