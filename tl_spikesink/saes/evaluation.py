"""How well an SAE reconstructs activations, split by spike, sink, delimiter and other tokens.

Massive activations dominate any squared-error metric pooled over tokens: one SmolLM2 first token
at ‖x‖ ≈ 3e4 weighs as much as ~20,000 ordinary tokens at ‖x‖ ≈ 170. :func:`sae_report` therefore
keeps every number per token class (:data:`TOKEN_CLASSES`: spike tokens, sink tokens that are not
spike tokens, other delimiters, the rest; exclusive, so per-class sums add up to the total):

* reconstruction: squared error, MSE per element, explained variance
  1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the class mean), L0, and the share of the squared error that lies
  in the scan's spike channels;
* latents: how often each latent fires on each class (dead latents, latents that fire on spike
  and sink tokens);
* next-token loss with the SAE spliced in (:data:`RUNS`): everywhere; only at spike tokens; only
  at sink tokens; everywhere except spike and sink tokens ("bypass"); and the activation zeroed
  everywhere (the baseline of loss recovered, as in sae-lens's evals). The loss at position i
  (predicting token i + 1) is filed under the class of token i. A splice at one token changes
  later positions through attention, so "only at spike tokens" measures what the SAE's error on
  the spike tokens costs the whole sequence.

Which tokens are spike and sink tokens comes from a scan of the same corpus (run here unless
given), so the classes follow the scan's definitions exactly. Everything is kept as sums, so
:meth:`SAEReport.merge` of two shards equals the report of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Batch, Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.logits import next_token_logprobs, nll
from tl_spikesink.probes.engine import HookFn, Pass, Probe, Step, run
from tl_spikesink.probes.scan import ScanConfig, ScanResult, as_corpus, scan_corpus
from tl_spikesink.results import Result
from tl_spikesink.saes.masks import (
    TOKEN_CLASSES,
    DelimiterIds,
    TokenClass,
    scan_mask,
    token_classes,
)
from tl_spikesink.saes.splice import check_sae, load_sae, reconstruct

Run = Literal["clean", "zero", "sae", "spike_only", "sink_only", "bypass"]
RUNS: tuple[Run, ...] = get_args(Run)
"""Forward passes per batch: clean; activation zeroed; SAE everywhere; SAE only at spike tokens;
only at sink tokens; everywhere but spike and sink tokens."""
Group = TokenClass | Literal["normal", "all"]
GROUPS: dict[str, tuple[TokenClass, ...]] = {
    **{c: (c,) for c in TOKEN_CLASSES},
    "normal": ("delimiter", "other"),
    "all": TOKEN_CLASSES,
}
"""Rows of the report: each class, the tokens that are neither spike nor sink, and all tokens."""


@dataclass(frozen=True, repr=False)
class SAEReport(Result):
    """Sums over a corpus of how an SAE reconstructs one hook point, per token class."""

    model: str
    hook: str
    sae: dict[str, Any]
    """The SAE: architecture, d_in, d_sae and its metadata (training settings, if recorded)."""
    corpus: tuple[dict[str, Any], ...]
    settings: dict[str, Any]
    spike_channels: tuple[int, ...]
    n_tokens: Int[torch.Tensor, " cls"]
    sq_error: Float[torch.Tensor, " cls"]
    """Σ ‖x − x̂‖² over the tokens of each class (float64, as are all sums)."""
    sq_error_spike_channels: Float[torch.Tensor, " cls"]
    """The part of `sq_error` in the spike channels."""
    sum_x: Float[torch.Tensor, "cls d_in"]
    sum_sq_x: Float[torch.Tensor, " cls"]
    """Σ ‖x‖²."""
    l0_sum: Float[torch.Tensor, " cls"]
    fires: Int[torch.Tensor, "cls d_sae"]
    """Tokens of each class on which each latent is active (> 0)."""
    n_predicted: Int[torch.Tensor, " cls"]
    """Scored positions (a real token followed by a real token), by the class of the first."""
    loss_sum: Float[torch.Tensor, "run cls"]
    """Σ next-token loss under each of `runs`, by class of the predicting position."""
    runs: tuple[Run, ...] = RUNS
    n_sink_spike: int = 0
    """Sink tokens that count as spike tokens (a token that is both is filed under spike)."""

    # ---------------------------------------------------------------- per-group numbers

    def _sum(self, x: torch.Tensor, group: Group) -> torch.Tensor:
        if group not in GROUPS:
            raise SpikeSinkError(f"unknown token group {group!r}; choose one of {tuple(GROUPS)}")
        return x[[TOKEN_CLASSES.index(c) for c in GROUPS[group]]].sum(0)

    def n(self, group: Group = "all") -> int:
        """Tokens in `group`."""
        return int(self._sum(self.n_tokens, group))

    def mse(self, group: Group = "all") -> float:
        """Mean squared error per element, Σ‖x − x̂‖² / (n · d_in)."""
        n = self.n(group)
        return float(self._sum(self.sq_error, group)) / (n * self.sae["d_in"]) if n else _NAN

    def explained_variance(self, group: Group = "all") -> float:
        """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean of the group's tokens."""
        n = self.n(group)
        if not n:
            return _NAN
        s = self._sum(self.sum_x, group)
        variance = float(self._sum(self.sum_sq_x, group) - s.dot(s) / n)
        return 1 - float(self._sum(self.sq_error, group)) / variance if variance > 0 else _NAN

    def l0(self, group: Group = "all") -> float:
        """Mean number of active latents per token."""
        n = self.n(group)
        return float(self._sum(self.l0_sum, group)) / n if n else _NAN

    def spike_channel_error_share(self, group: Group = "all") -> float:
        """Share of the squared error that lies in the scan's spike channels."""
        total = float(self._sum(self.sq_error, group))
        return float(self._sum(self.sq_error_spike_channels, group)) / total if total else _NAN

    def loss(self, run: Run = "sae", group: Group = "all") -> float:
        """Mean next-token loss under `run` at the positions of `group`."""
        if run not in self.runs:
            raise SpikeSinkError(f"run {run!r} was not measured; measured: {self.runs}")
        n = int(self._sum(self.n_predicted, group))
        return float(self._sum(self.loss_sum[self.runs.index(run)], group)) / n if n else _NAN

    def delta_loss(self, run: Run = "sae", group: Group = "all") -> float:
        """Loss under `run` minus the clean loss, at the positions of `group`."""
        return self.loss(run, group) - self.loss("clean", group)

    def loss_recovered(self, run: Run = "sae", group: Group = "all") -> float:
        """(L_zero − L_run) / (L_zero − L_clean): 1 when the splice costs nothing."""
        if "zero" not in self.runs:
            return _NAN
        gap = self.loss("zero", group) - self.loss("clean", group)
        return (self.loss("zero", group) - self.loss(run, group)) / gap if gap else _NAN

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.fires.shape[1])

    @property
    def dead_latents(self) -> int:
        """Latents that never fire on this corpus."""
        return int((self.fires.sum(0) == 0).sum())

    def latent_frequency(self, group: Group = "all") -> Float[torch.Tensor, " d_sae"]:
        """Share of the group's tokens on which each latent fires."""
        n = self.n(group)
        return self._sum(self.fires, group).double() / n if n else torch.full((self.d_sae,), _NAN)

    def firing_latents(
        self, group: Group = "spike", n: int = 5
    ) -> tuple[tuple[int, float, float], ...]:
        """The latents firing most often on `group`: (latent, frequency there, on normal tokens)."""
        here, normal = self.latent_frequency(group), self.latent_frequency("normal")
        if not self.n(group):
            return ()
        order = torch.argsort(here, descending=True, stable=True)[:n]
        return tuple(
            (int(i), float(here[i]), float(normal[i])) for i in order.tolist() if here[i] > 0
        )

    # ---------------------------------------------------------------- plumbing

    def merge(self, other: SAEReport) -> SAEReport:
        """The report of both corpora (same model, hook, SAE and runs)."""
        for f in ("model", "hook", "sae", "runs", "spike_channels", "settings"):
            if getattr(self, f) != getattr(other, f):
                raise SpikeSinkError(
                    f"cannot merge SAE reports with different {f} ({getattr(self, f)!r} vs "
                    f"{getattr(other, f)!r}); report both shards with the same SAE and settings"
                )
        summed = {
            f: getattr(self, f) + getattr(other, f)
            for f in (
                "n_tokens",
                "sq_error",
                "sq_error_spike_channels",
                "sum_x",
                "sum_sq_x",
                "l0_sum",
                "fires",
                "n_predicted",
                "loss_sum",
            )
        }
        return replace(
            self,
            corpus=self.corpus + other.corpus,
            n_sink_spike=self.n_sink_spike + other.n_sink_spike,
            **summed,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers, settings and provenance (NaN becomes null)."""
        from tl_spikesink.views.format import json_clean

        rows = {
            g: {
                "n_tokens": self.n(g),
                "mse": self.mse(g),
                "explained_variance": self.explained_variance(g),
                "l0": self.l0(g),
                "spike_channel_error_share": self.spike_channel_error_share(g),
                "loss": {r: self.loss(r, g) for r in self.runs},
                "delta_loss": {r: self.delta_loss(r, g) for r in self.runs if r != "clean"},
            }
            for g in GROUPS
        }
        return json_clean(
            {
                "model": self.model,
                "hook": self.hook,
                "sae": self.sae,
                "corpus": list(self.corpus),
                "settings": self.settings,
                "spike_channels": list(self.spike_channels),
                "groups": rows,
                "loss_recovered": {
                    r: self.loss_recovered(r) for r in self.runs if r not in ("clean", "zero")
                },
                "d_sae": self.d_sae,
                "dead_latents": self.dead_latents,
                "firing_latents": {
                    g: [list(x) for x in self.firing_latents(g, 10)] for g in ("spike", "sink")
                },
                "n_sink_spike": self.n_sink_spike,
            }
        )

    def __str__(self) -> str:
        from tl_spikesink.views.saes import render_report

        return render_report(self)


_NAN = float("nan")


def sae_report(
    model: Any,
    sae: Any,
    texts: Sequence[str] | str | Corpus | None = None,
    *,
    hook: str | None = None,
    scan: ScanResult | None = None,
    runs: Sequence[Run] = RUNS,
    config: ScanConfig | None = None,
    progress: bool = True,
    **settings: Any,
) -> SAEReport:
    """Evaluate an SAE at its hook point of `model`, split by spike, sink, delimiter, other tokens.

    Args:
        model: a HookedTransformer or HookedSAETransformer (with no SAE attached at the hook);
            it is only borrowed.
        sae: an sae-lens SAE, or the path of a saved SAE folder.
        texts: held-out texts, a Corpus, or None for the default corpus (cap it with max_tokens=).
        hook: the hook point (default: the SAE's ``cfg.metadata.hook_name``).
        scan: a scan of the same corpus, for the spike and sink tokens (default: scanned here).
        runs: forward passes to measure (see :data:`RUNS`; "clean" is always run).
        config: scan / batching settings.
        progress: show progress bars.
        **settings: override single fields of `config` (e.g. ``max_seq_len=128,
            max_tokens=4096``).

    Returns:
        A frozen :class:`SAEReport`; ``print(report)`` shows the table.

    Example:
        >>> report = sae_report(model, "path/to/sae", texts, max_seq_len=128)  # doctest: +SKIP
        >>> report.explained_variance("normal"), report.delta_loss("sae", "all")  # doctest: +SKIP
    """
    anatomy = Anatomy.of(model)
    sae = load_sae(sae)
    hook = check_sae(model, sae, hook)
    runs = ("clean", *dict.fromkeys(r for r in runs if r != "clean"))
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SpikeSinkError(f"unknown run {bad[0]!r}; choose from {RUNS}")
    config = replace(config or ScanConfig(), **settings)
    corpus = as_corpus(model, texts, config)
    if scan is None:
        scan = scan_corpus(model, corpus, config, progress=progress, desc="scan")
    else:
        _check_scan_of(scan, corpus)
    channels = tuple(scan.spikes.channels)
    sums = _Sums(len(TOKEN_CLASSES), sae.cfg.d_in, sae.cfg.d_sae, len(runs))
    clean = _CleanSplit(sae, hook, scan, sums, channels, DelimiterIds(model.tokenizer), runs)
    passes = [Pass([clean])]
    for i, run_name in enumerate(runs[1:], start=1):
        splice = _Splice(clean, i, hook, zero=run_name == "zero")
        # A splice at no position is the clean pass: its loss was filed already.
        passes.append(Pass([splice], skip=splice.nowhere))
    run(model, corpus, passes=passes, progress=progress, desc="SAE report", **config.batching())
    return SAEReport(
        model=anatomy.model_name,
        hook=hook,
        sae=_describe(sae),
        corpus=(corpus.describe(),),
        settings={"batch_size": config.batch_size, "seed": config.seed, "scan": _scan_id(scan)},
        spike_channels=channels,
        runs=runs,
        n_sink_spike=sums.n_sink_spike,
        **sums.tensors(),
    )


class _CleanSplit(Probe):
    """The clean pass of each batch: token classes, the activation, its reconstruction, loss."""

    needs_logits = True

    def __init__(self, sae, hook, scan, sums, channels, delimiters, runs):
        self.sae, self.hook, self.scan, self.sums = sae, hook, scan, sums
        self.channels, self.delimiters, self.runs = channels, delimiters, runs

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(self.hook, self._grab)]

    def start_batch(self, step: Step) -> None:
        batch = step.batch
        spike, sink = scan_mask(self.scan, batch, "spike"), scan_mask(self.scan, batch, "sink")
        self.classes = token_classes(batch, spike, sink, self.delimiters(batch.tokens))
        self.sums.n_sink_spike += int((spike & sink).sum())
        self.where = [_where(r, self.classes).to(step.mask.device) for r in self.runs]

    def _grab(self, act: torch.Tensor, hook: Any) -> None:
        self.x = act.detach().clone()

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        self.recon, acts = reconstruct(self.sae, self.x)
        self.sums.add_reconstruction(self.x, self.recon, acts, self.classes, self.channels)
        self.loss = _nll_by_position(logits, step.batch)
        for i, where in enumerate(self.where):
            if i == 0 or not where.any():
                self.sums.add_loss(i, self.loss, self.classes, step.batch)


class _Splice(Probe):
    """One spliced pass: the SAE's reconstruction (or zeros) at run `i`'s positions, then loss."""

    needs_logits = True
    writes = True

    def __init__(self, clean: _CleanSplit, i: int, hook: str, zero: bool):
        self.clean, self.i, self.hook, self.zero = clean, i, hook, zero

    def nowhere(self, step: Step) -> bool:
        """True when this run splices at no position of the batch (then it is the clean pass)."""
        return not bool(self.clean.where[self.i].any())

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(self.hook, self._replace)]

    def _replace(self, act: torch.Tensor, hook: Any) -> torch.Tensor:
        value = torch.zeros_like(act) if self.zero else self.clean.recon
        return torch.where(self.clean.where[self.i][..., None], value.to(act.dtype), act)

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        loss = _nll_by_position(logits, step.batch)
        self.clean.sums.add_loss(self.i, loss, self.clean.classes, step.batch)


def _where(run: Run, classes: Int[torch.Tensor, "batch pos"]) -> torch.Tensor:
    spike, sink = TOKEN_CLASSES.index("spike"), TOKEN_CLASSES.index("sink")
    if run == "spike_only":
        return classes == spike
    if run == "sink_only":
        return classes == sink
    if run == "bypass":
        return (classes >= 0) & (classes != spike) & (classes != sink)
    return classes >= 0


def _nll_by_position(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: Batch
) -> Float[torch.Tensor, " n"]:
    logp, targets = next_token_logprobs(logits, batch)
    return nll(logp, targets).double().cpu()


class _Sums:
    """Per-class running sums of one report (float64 where values are summed)."""

    def __init__(self, n_classes: int, d_in: int, d_sae: int, n_runs: int):
        f64 = torch.float64
        self.n_tokens = torch.zeros(n_classes, dtype=torch.long)
        self.sq_error = torch.zeros(n_classes, dtype=f64)
        self.sq_error_spike_channels = torch.zeros(n_classes, dtype=f64)
        self.sum_x = torch.zeros(n_classes, d_in, dtype=f64)
        self.sum_sq_x = torch.zeros(n_classes, dtype=f64)
        self.l0_sum = torch.zeros(n_classes, dtype=f64)
        self.fires = torch.zeros(n_classes, d_sae, dtype=torch.long)
        self.n_predicted = torch.zeros(n_classes, dtype=torch.long)
        self.loss_sum = torch.zeros(n_runs, n_classes, dtype=f64)
        self.n_sink_spike = 0

    def add_reconstruction(
        self,
        x: Float[torch.Tensor, "batch pos d_in"],
        recon: Float[torch.Tensor, "batch pos d_in"],
        acts: Float[torch.Tensor, "batch pos d_sae"],
        classes: Int[torch.Tensor, "batch pos"],
        channels: tuple[int, ...],
    ) -> None:
        real = (classes >= 0).to(x.device)
        cls = classes[classes >= 0]
        x, recon, active = x[real].double().cpu(), recon[real].double().cpu(), acts[real] > 0
        err = (x - recon).pow(2)
        n = len(self.n_tokens)
        self.n_tokens += torch.bincount(cls, minlength=n)
        self.sq_error += torch.bincount(cls, err.sum(-1), minlength=n)
        if channels:
            in_channels = err[:, list(channels)].sum(-1)
            self.sq_error_spike_channels += torch.bincount(cls, in_channels, minlength=n)
        self.sum_x.index_add_(0, cls, x)
        self.sum_sq_x += torch.bincount(cls, x.pow(2).sum(-1), minlength=n)
        self.l0_sum += torch.bincount(cls, active.sum(-1).double().cpu(), minlength=n)
        self.fires.index_add_(0, cls, active.long().cpu())

    def add_loss(
        self, run: int, nll: Float[torch.Tensor, " n"], classes: torch.Tensor, batch: Batch
    ) -> None:
        scored = batch.mask[:, :-1] & batch.mask[:, 1:]
        cls = classes[:, :-1][scored]
        n = len(self.n_tokens)
        if run == 0:
            self.n_predicted += torch.bincount(cls, minlength=n)
        self.loss_sum[run] += torch.bincount(cls, nll, minlength=n)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def _check_scan_of(scan: ScanResult, corpus: Corpus) -> None:
    mine = corpus.describe()
    same = [
        c
        for c in scan.corpus
        if all(c.get(k) == mine[k] for k in ("sha256", "n_sequences", "n_tokens", "max_seq_len"))
    ]
    if len(scan.corpus) != 1 or not same:
        raise SpikeSinkError(
            "scan= must be a scan of the texts being evaluated (same texts, max_seq_len and "
            f"max_tokens: {mine['n_tokens']} tokens, sha256 {mine['sha256'][:12]}), since spike "
            "and sink tokens are looked up by position; leave scan=None to scan them here"
        )


def _scan_id(scan: ScanResult) -> dict[str, Any]:
    c = scan.config
    return {
        "abs_threshold": c.abs_threshold,
        "rel_threshold": c.rel_threshold,
        "epsilon": c.epsilon,
        "sink_token_share": c.sink_token_share,
    }


def _describe(sae: Any) -> dict[str, Any]:
    from tl_spikesink.views.format import json_clean

    meta = getattr(sae.cfg, "metadata", None)
    meta = meta.to_dict() if hasattr(meta, "to_dict") else {}
    return json_clean(
        {
            "class": type(sae).__name__,
            "architecture": sae.cfg.architecture(),
            "d_in": int(sae.cfg.d_in),
            "d_sae": int(sae.cfg.d_sae),
            "metadata": {k: v for k, v in meta.items() if _jsonable(v)},
        }
    )


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, tuple, dict))


__all__ = ["GROUPS", "RUNS", "SAEReport", "sae_report"]
