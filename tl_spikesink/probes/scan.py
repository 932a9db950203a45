"""One call that says where a model's spikes and sinks are: texts → one forward per batch → probes.

The model is borrowed: the scan adds read-only hooks for the length of each forward pass (through
`model.hooks`, which removes exactly the hooks it added), runs under `torch.inference_mode`, and
never asks for logits it does not need.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy, require_hooks
from tl_spikesink.config import ScanConfig
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import HookFn, Probe, device_of, run
from tl_spikesink.probes.kurtosis import KurtosisProbe, KurtosisStats
from tl_spikesink.probes.reducers import check_same
from tl_spikesink.probes.sinks import SinkProbe, SinkStats
from tl_spikesink.probes.spikes import SpikeProbe, SpikeStats
from tl_spikesink.results import Result


@dataclass(frozen=True, repr=False)
class ScanResult(Result):
    """Where the spikes and sinks are, with the model, corpus and settings that produced it."""

    model: str
    prepend_bos: bool
    n_layers: int
    n_heads: int
    d_model: int
    n_tokens: int
    n_sequences: int
    corpus: tuple[dict[str, Any], ...]
    """Record of each corpus merged into this result (name, sizes, sha256)."""
    config: ScanConfig
    spikes: SpikeStats
    sinks: SinkStats
    environment: dict[str, str] = field(default_factory=dict)
    kurtosis: KurtosisStats | None = None
    """Excess-kurtosis sums per layer (see :func:`~tl_spikesink.probes.kurtosis.excess_kurtosis`)."""

    def merge(self, other: ScanResult) -> ScanResult:
        """The scan of both corpora together (same model and settings required).

        Shards of one corpus (:meth:`Corpus.shard`, same fingerprint) keep their text indices;
        scans of different corpora are concatenated, so `other`'s text indices move past ours.
        """
        check_same(
            self, other, ("model", "prepend_bos", "n_layers", "n_heads", "d_model", "config")
        )
        twice = [c for c in other.corpus if c in self.corpus]
        if twice:
            raise SpikeSinkError(
                f"both scans read corpus {twice[0]['name']!r} (sha256 {twice[0]['sha256'][:12]}); "
                "merging would count its tokens twice. Merge scans of different corpora or of "
                "different shards (Corpus.shard)"
            )
        shards = {c["sha256"] for c in self.corpus} == {c["sha256"] for c in other.corpus}
        offset = 0 if shards else self.n_texts
        return replace(
            self,
            n_tokens=self.n_tokens + other.n_tokens,
            n_sequences=self.n_sequences + other.n_sequences,
            corpus=self.corpus + other.corpus,
            spikes=self.spikes.merge(other.spikes.shift_texts(offset)),
            sinks=self.sinks.merge(other.sinks.shift_texts(offset)),
            kurtosis=None  # a scan from before kurtosis existed has none to merge
            if self.kurtosis is None or other.kurtosis is None
            else self.kurtosis.merge(other.kurtosis.shift_texts(offset)),
        )

    @property
    def n_texts(self) -> int:
        """Texts read (a corpus split into shards counts once)."""
        return sum({c["sha256"]: c["n_texts"] for c in self.corpus}.values())

    @property
    def sink_spike_overlap(self) -> float:
        """Share of sink tokens that are also spike tokens."""
        spike_refs = {t.token for t in self.spikes.tokens}
        sinks = self.sinks.tokens
        return sum(t.token in spike_refs for t in sinks) / len(sinks) if sinks else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready report."""
        from tl_spikesink.views.text import to_dict

        return to_dict(self)

    def __str__(self) -> str:
        from tl_spikesink.views.text import summary

        return summary(self)


def scan(
    model: Any,
    texts: Sequence[str] | str | Corpus | None = None,
    config: ScanConfig | None = None,
    *,
    progress: bool = True,
    **settings: Any,
) -> ScanResult:
    """Scan `model` over `texts` for massive activations and attention sinks.

    Args:
        model: a HookedTransformer (or HookedSAETransformer, or TransformerBridge in
            compatibility mode). It is only read: no parameter changes and no hook stays behind.
        texts: strings, a tokenized :class:`Corpus`, or None for the default offline corpus.
        config: settings (default :class:`ScanConfig`).
        progress: show a progress bar.
        **settings: override single fields of `config` (e.g. ``batch_size=4``).

    Returns:
        A frozen :class:`ScanResult`; `print(result)` shows the summary.

    Example:
        >>> result = scan(model, ["The cat sat.", "Hello world."], batch_size=2)  # doctest: +SKIP
        >>> result.spikes.channels, result.sinks.sink_ratio  # doctest: +SKIP
    """
    config = replace(config or ScanConfig(), **settings)
    Anatomy.of(model)  # a clear error before tokenizing, if this is no TransformerLens model
    return scan_corpus(model, as_corpus(model, texts, config), config, progress=progress)


class ScanProbes:
    """The scan's two probes for one model and config, and the result they add up to."""

    def __init__(self, model: Any, config: ScanConfig):
        anatomy = Anatomy.of(model)
        layers = range(anatomy.n_layers)
        require_hooks(model, config.spike_sites, layers, "the spike scan")
        require_hooks(model, ("pattern",), layers, "the sink scan")
        torch.manual_seed(config.seed)
        self.anatomy, self.config = anatomy, config
        self.kurtosis = KurtosisProbe(anatomy.n_layers, config.abs_threshold, config.max_candidates)
        self.spikes = SpikeProbe(
            anatomy.n_layers,
            config.spike_sites,
            config.abs_threshold,
            config.rel_threshold,
            config.top_k,
            config.max_candidates,
            kurtosis=self.kurtosis,
        )
        self.sinks = SinkProbe(
            anatomy.n_layers,
            anatomy.n_heads,
            config.epsilon,
            config.sink_token_share,
            config.min_queries,
            config.top_k,
            config.max_candidates,
            probe_len=config.sink_probe_len,
            min_len=config.sink_min_len,
            causal=anatomy.causal,
        )

    @property
    def probes(self) -> tuple[Probe, ...]:
        """The probes to hand to :func:`~tl_spikesink.probes.engine.run`."""
        return (self.spikes, self.sinks, self.kurtosis)

    def result(self, model: Any, corpus: Corpus) -> ScanResult:
        """Freeze what the probes saw of `corpus` into a :class:`ScanResult`."""
        spikes, sinks = self.spikes.result({}), self.sinks.result()
        strings = _token_strings(model, spikes.token_ids() | sinks.token_ids())
        a = self.anatomy
        return ScanResult(
            model=a.model_name,
            prepend_bos=corpus.prepend_bos,
            n_layers=a.n_layers,
            n_heads=a.n_heads,
            d_model=a.d_model,
            n_tokens=corpus.n_tokens,
            n_sequences=len(corpus.chunks),
            corpus=(corpus.describe(),),
            config=self.config,
            spikes=replace(spikes, token_strings=strings),
            sinks=replace(sinks, token_strings=strings),
            environment=environment(model),
            kurtosis=self.kurtosis.result(),
        )


def scan_corpus(
    model: Any,
    corpus: Corpus,
    config: ScanConfig,
    *,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    probes: Sequence[Probe] = (),
    progress: bool = True,
    desc: str = "scan",
) -> ScanResult:
    """Scan a tokenized corpus, optionally under write hooks (an intervention).

    `fwd_hooks` run before the probes at each hook point, so the probes see what they wrote.
    Extra `probes` ride along in the same forward passes.
    """
    scanned = ScanProbes(model, config)
    run(
        model,
        corpus,
        [*scanned.probes, *probes],
        fwd_hooks=fwd_hooks,
        batch_size=config.batch_size,
        padding_side=config.padding_side,
        progress=progress,
        desc=desc,
    )
    return scanned.result(model, corpus)


def as_corpus(
    model: Any,
    texts: Sequence[str] | str | Corpus | None,
    config: ScanConfig,
    name: str | None = None,
) -> Corpus:
    """`texts` tokenized as `config` says (a Corpus as it is; None: the default corpus)."""
    if isinstance(texts, Corpus):
        return texts
    if texts is None:
        texts, name = default_texts(), "pydoc_data.topics (default)"
    return tokenize(
        model,
        texts,
        name=name or "texts",
        max_seq_len=config.max_seq_len,
        max_tokens=config.max_tokens,
        long_texts=config.long_texts,
        prepend_bos=config.prepend_bos,
    )


def _token_strings(model: Any, ids: set[int]) -> dict[int, str]:
    return {i: model.tokenizer.decode([i]) for i in sorted(ids)}


def environment(model: Any) -> dict[str, str]:
    """Versions and device recorded with every result, so a number can be traced to its run."""
    first = next(iter(model.parameters()), None)
    return {
        **_versions(),
        "device": str(device_of(model)),
        "dtype": "" if first is None else str(first.dtype),
    }


@cache
def _versions() -> dict[str, str]:
    # Read once per process: finding an installed package's metadata takes milliseconds.
    from importlib.metadata import version

    from tl_spikesink import __version__

    return {
        "tl_spikesink": __version__,
        "transformer_lens": version("transformer-lens"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


__all__ = ["ScanConfig", "ScanProbes", "ScanResult", "as_corpus", "scan", "scan_corpus"]
