"""The seed paper's training ablations (Tables 3–8) as variants, and our table set beside theirs.

Sun et al. retrain a 7B Llama-style model once per row and report held-out perplexity, the Eq. 28
sink ratio and the absolute Spike (baseline 10.1 / 46.0 % / 3818). :data:`PAPER_ROWS` holds every
row with its published numbers and the :class:`~tl_spikesink.training.variants.Variant` that
changes the same one thing in our miniature; :func:`compare` reads an
:class:`~tl_spikesink.training.ablation.AblationTable` trained on those variants and says, row by
row, whether the change from the baseline goes the same way as in the paper.

Every row trains full-length sequences with the loss at every position (the paper's regime),
unless it is a Table 8 row. Scaling a 4096-token, 32-head, d_head-128 model down to ours keeps
ratios to the baseline wherever our size allows; where it does not, :attr:`PaperRow.here` says
what we trained instead:

* learning rates, β2, weight decay, token budget: the same ratios to the baseline's values;
* #heads at fixed d_head (Table 6): 1/4 and 1/2 of the config's heads;
* d_head at fixed #heads: 1/8, 1/4 and 1/2 of the config's d_head (the paper's d_head 8, 1/16 of
  its baseline, would be below the 2 that rotary positions need at our d_head 16);
* d_head/#heads at fixed width: the same factorizations down to d_head 2;
* a row whose head shape a config cannot host (an odd d_head, or one below 2: the 1/8 and 1/4
  rows under a d_head-4 baseline) is left out of "paper" with a warning and listed as
  :attr:`PaperComparison.not_hosted`;
* short contexts (Table 8, 1/256 and 1/1024): L/4 and L/2 instead of L/16 and L/4, since the
  sink ratio at T < 16 queries counts a uniform head as a sink (H_T / T > 0.3 for T ≤ 8);
* loss only at positions ≥ min of length max: the same fractions of L.

Directions: a change from the baseline is "up" or "down" when it exceeds :data:`THRESHOLD` of
the baseline's value (sink ratio: and at least :data:`SINK_FLOOR` in absolute terms), else
"same"; for us the values are means over seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.results import Result
from tl_spikesink.views.format import json_clean, text_table

Direction = Literal["up", "down", "same"]

THRESHOLD = 0.2
"""A change counts when it exceeds this share of the baseline's value."""
SINK_FLOOR = 0.02
"""... and, for the sink ratio, this much in absolute terms (two points of heads)."""

PAPER_BASELINE = {"perplexity": 10.1, "sink_ratio": 0.460, "spike": 3818.0}
"""The paper's baseline row (every table repeats it)."""

ARROWS = {"up": "↑", "down": "↓", "same": "≈"}
SEEDS_MARK = "(k/n) after a verdict: k of the row's n seeds move, each on its own, as the mean."


@dataclass(frozen=True)
class PaperRow:
    """One row of Tables 3–8: what the paper changed and measured, and our variant of it."""

    name: str
    """Variant name in our tables (``ablate --variants paper:NAME``)."""
    table: int
    label: str
    """The row as the paper prints it."""
    perplexity: float
    sink_ratio: float
    """A share (0.46 for 46.0 %)."""
    spike: float
    changes: dict[str, Any] = field(default_factory=dict)
    """The Variant fields that differ from the baseline's; head shapes as ratios to the
    config's (``d_head_scale``, ``n_heads_scale``, ``keep_heads``: the config's head count)."""
    here: str = ""
    """What we train instead, where our size cannot keep the paper's ratio."""

    def variant(self, config: Any) -> Any:
        """Our :class:`~tl_spikesink.training.variants.Variant` for this row under `config`."""
        from tl_spikesink.training.variants import Variant

        changes = dict(self.changes)
        d_head_scale = changes.pop("d_head_scale", 1.0)
        n_heads_scale = changes.pop("n_heads_scale", None)
        keep_heads = changes.pop("keep_heads", False)
        heads = config.d_model // config.d_head
        if d_head_scale != 1.0:
            changes["d_head"] = _whole(config.d_head * d_head_scale, self.name, "d_head")
        if n_heads_scale is not None:
            changes["n_heads"] = _whole(heads * n_heads_scale, self.name, "n_heads")
        if keep_heads:
            changes["n_heads"] = heads
        return Variant(self.name, context="long", **changes)

    def unfit(self, config: Any) -> str | None:
        """Why a model of `config`'s size cannot host this row (None when it can)."""
        try:
            self.variant(config)
        except SpikeSinkError as e:
            return str(e)
        return None

    def direction(self, quantity: str) -> Direction:
        """The paper's change from its baseline in `quantity` ("sink_ratio" or "spike")."""
        return direction(getattr(self, quantity), PAPER_BASELINE[quantity], quantity)


def _rows() -> tuple[PaperRow, ...]:
    r = PaperRow
    same_heads, width = {"keep_heads": True}, {}
    # fmt: off
    return (
        r("baseline", 3, "baseline", 10.1, 0.460, 3818),
        r("lr_7.5e-5", 3, "lr 7.5e-5", 11.8, 0.186, 1447, {"lr_scale": 0.25}),
        r("lr_1.5e-4", 3, "lr 1.5e-4", 10.7, 0.318, 2251, {"lr_scale": 0.5}),
        r("lr_6e-4", 3, "lr 6e-4", 10.0, 0.515, 3773, {"lr_scale": 2.0}),
        r("lr_1.2e-3", 3, "lr 1.2e-3", 10.2, 0.392, 2723, {"lr_scale": 4.0}),
        r("no_lr_decay", 3, "min lr 3e-4 (no decay)", 10.7, 0.568, 2870, {"min_lr_ratio": 1.0}),
        r("weight_decay_0", 3, "weight decay 0.0", 10.4, 0.338, 12275, {"weight_decay": 0.0}),
        r("beta2_0.9", 3, "β2 0.9", 10.1, 0.490, 2832, {"beta2": 0.9}),
        r("beta2_0.999", 3, "β2 0.999", 10.7, 0.209, 1855, {"beta2": 0.999}),
        r("tokens_200B", 3, "200B tokens", 9.5, 0.633, 1848, {"token_scale": 2.0}),
        r("ffn_gelu", 4, "FFN GeLU", 10.1, 0.693, 3369, {"ffn": "gelu"}),
        r("ffn_linear", 4, "FFN Linear", 12.5, 0.589, 688, {"ffn": "linear"}),
        r("attention_only", 4, "Attention-only", 10.8, 0.739, 637, {"ffn": "none"}),
        r("sandwich", 5, "Sandwich norm", 9.8, 0.447, 520, {"norm": "sandwich"}),
        r("sandwich_qk_norm", 5, "Sandwich (QK-norm)", 10.0, 0.420, 92,
          {"norm": "sandwich", "qk_norm": True}),
        r("dyt", 5, "DynamicTanh", 10.0, 0.610, 153, {"norm": "dyt"}),
        r("heads_8", 6, "8 heads (d_head 128)", 10.4, 0.371, 1253, {"n_heads_scale": 0.25},
          "1/4 of the heads at the same d_head"),
        r("heads_16", 6, "16 heads (d_head 128)", 10.3, 0.417, 1936, {"n_heads_scale": 0.5},
          "1/2 of the heads at the same d_head"),
        r("d_head_16_heads_32", 6, "d_head 16 (32 heads)", 10.8, 0.098, 315,
          {"d_head_scale": 0.125, **same_heads}, "d_head 1/8 of the config's, same heads"),
        r("d_head_32_heads_32", 6, "d_head 32 (32 heads)", 10.5, 0.279, 829,
          {"d_head_scale": 0.25, **same_heads}, "d_head 1/4 of the config's, same heads"),
        r("d_head_64_heads_32", 6, "d_head 64 (32 heads)", 10.3, 0.377, 2112,
          {"d_head_scale": 0.5, **same_heads}, "d_head 1/2 of the config's, same heads"),
        r("d_head_16_width", 6, "d_head/#heads 16/256 (width 4096)", 10.4, 0.308, 1750,
          {"d_head_scale": 0.125, **width}, "d_head 1/8 of the config's at the same width"),
        r("d_head_32_width", 6, "d_head/#heads 32/128 (width 4096)", 10.3, 0.411, 1916,
          {"d_head_scale": 0.25, **width}, "d_head 1/4 of the config's at the same width"),
        r("d_head_64_width", 6, "d_head/#heads 64/64 (width 4096)", 10.2, 0.441, 2523,
          {"d_head_scale": 0.5, **width}, "d_head 1/2 of the config's at the same width"),
        r("d_head_256_width", 6, "d_head/#heads 256/16 (width 4096)", 10.1, 0.521, 3429,
          {"d_head_scale": 2.0, **width}, "d_head 2x the config's at the same width"),
        r("gate_channel", 7, "gate, conditional, channel", 10.0, 0.045, 202,
          {"gate": "input", "gate_shape": "channel"}),
        r("gate_head", 7, "gate, conditional, head", 10.1, 0.064, 186,
          {"gate": "input", "gate_shape": "head"}),
        r("gate_single", 7, "gate, conditional, single", 10.2, 0.312, 316,
          {"gate": "input", "gate_shape": "single"}),
        r("gate_channel_unconditional", 7, "gate, unconditional, channel", 10.1, 0.422, 1922,
          {"gate": "constant", "gate_shape": "channel"}),
        r("gate_head_unconditional", 7, "gate, unconditional, head", 10.1, 0.413, 1884,
          {"gate": "constant", "gate_shape": "head"}),
        r("gate_single_unconditional", 7, "gate, unconditional, single", 10.2, 0.443, 1797,
          {"gate": "constant", "gate_shape": "single"}),
        r("gate_positional", 7, "gate, static signal, positional", 10.1, 0.411, 1755,
          {"gate": "positional"}, "one gate per head"),
        r("gate_token", 7, "gate, static signal, token embedding", 10.0, 0.311, 1966,
          {"gate": "token"}, "one gate per head"),
        r("context_256", 8, "loss positions 1/256", 12.4, 0.421, 5411, {"seq_scale": 0.25},
          "context L/4 (the paper's is L/16)"),
        r("context_1024", 8, "loss positions 1/1024", 10.6, 0.463, 4442, {"seq_scale": 0.5},
          "context L/2 (the paper's is L/4)"),
        r("loss_1024_4096", 8, "loss positions 1024/4096", 10.1, 0.130, 38470,
          {"loss_from": 0.25}),
        r("loss_1024_5120", 8, "loss positions 1024/5120", 10.1, 0.080, 42365,
          {"loss_from": 0.25, "seq_scale": 1.25}),
        r("loss_2048_4096", 8, "loss positions 2048/4096", 10.6, 0.012, 7193,
          {"loss_from": 0.5}),
        r("loss_2048_6144", 8, "loss positions 2048/6144", 10.0, 0.058, 30634,
          {"loss_from": 0.5, "seq_scale": 1.5}),
    )
    # fmt: on


def _whole(x: float, row: str, what: str) -> int:
    # Rotary positions rotate pairs of dimensions, so a head needs an even d_head.
    if x < 1 or x != int(x) or (what == "d_head" and x % 2):
        raise SpikeSinkError(
            f"paper row {row!r} needs {what} = {x:g} at this size (d_head must be even for "
            "rotary positions); pick a TrainConfig whose d_head is divisible by 16 and head "
            "count by 4 (the default's are)"
        )
    return int(x)


PAPER_ROWS: tuple[PaperRow, ...] = _rows()
"""Every row of the paper's Tables 3–8, the baseline first."""


def paper_row(name: str) -> PaperRow:
    """The row called `name` (see :data:`PAPER_ROWS`)."""
    for row in PAPER_ROWS:
        if row.name == name:
            return row
    raise SpikeSinkError(f"no paper row {name!r}; rows are {', '.join(r.name for r in PAPER_ROWS)}")


def paper_variants(config: Any, names: Any = None) -> list[Any]:
    """Our variants of the paper's rows (all, or those in `names`) under `config`.

    Asked for all rows, those `config`'s size cannot host (head shapes below d_head 2) are left
    out with a warning that names them; a row asked for by name that does not fit raises.
    """
    if names is not None:
        return [paper_row(n).variant(config) for n in names]
    unfit = [row.name for row in PAPER_ROWS if row.unfit(config)]
    if unfit:
        warnings.warn(
            f"{len(unfit)} of the paper's rows do not fit d_head={config.d_head}, "
            f"d_model={config.d_model} and are left out: {', '.join(unfit)}",
            stacklevel=2,
        )
    return [row.variant(config) for row in PAPER_ROWS if row.name not in unfit]


def same_bar(baseline: float, quantity: str) -> float:
    """The largest change from `baseline` that counts as ≈ (THRESHOLD, and SINK_FLOOR)."""
    bar = THRESHOLD * abs(baseline)
    return max(bar, SINK_FLOOR) if quantity == "sink_ratio" else bar


def direction(value: float, baseline: float, quantity: str) -> Direction:
    """'up', 'down' or 'same': the change from `baseline` against :func:`same_bar`."""
    delta = value - baseline
    if math.isnan(delta) or abs(delta) <= same_bar(baseline, quantity):
        return "same"
    return "up" if delta > 0 else "down"


@dataclass(frozen=True)
class Comparison:
    """One of our rows beside the paper's: per-seed values and the directions of change."""

    row: PaperRow
    seeds: tuple[int, ...]
    perplexity: tuple[float, ...]
    sink_ratio: tuple[float, ...]
    spike: tuple[float, ...]
    first_token_spike_ratio: tuple[float, ...]
    peak_sink_ratio: tuple[float, ...]
    """Each run's highest Eq. 28 sink ratio along its emergence curve: sinks that formed and
    then faded show here and not in `sink_ratio` (the end of training)."""
    ours: dict[str, Direction]
    """Our change from our baseline, per quantity (means over seeds)."""
    by_seed: dict[str, tuple[Direction, ...]] = field(default_factory=dict)
    """Each seed's own change from the baseline's mean, per quantity: a mean can move while
    its seeds split (one seed loses its sinks, the others keep them)."""

    @property
    def steady(self) -> dict[str, bool]:
        """Per quantity, whether every seed moves as the mean does."""
        return {q: all(d == self.ours[q] for d in self.by_seed.get(q, ())) for q in QUANTITIES}

    def seeds_with_mean(self, quantity: str) -> int:
        """How many seeds move in `quantity` as the mean does."""
        return sum(d == self.ours[quantity] for d in self.by_seed.get(quantity, ()))

    @property
    def paper(self) -> dict[str, Direction]:
        """The paper's change from its baseline, per quantity."""
        return {q: self.row.direction(q) for q in QUANTITIES}

    @property
    def agrees(self) -> dict[str, bool]:
        """Whether our direction is the paper's, per quantity."""
        return {q: self.ours[q] == self.paper[q] for q in QUANTITIES}

    def marks(self, separator: str = " ") -> dict[str, str]:
        """Per quantity, "↓ ↓ agrees": the paper's arrow, ours and the verdict.

        Empty for the baseline, the reference both directions are measured from.
        """
        if self.row.name == "baseline":
            return {q: "" for q in QUANTITIES}
        n = len(self.by_seed.get(QUANTITIES[0], ()))
        return {
            q: f"{ARROWS[self.paper[q]]}{separator}{ARROWS[self.ours[q]]} "
            + ("agrees" if self.agrees[q] else "differs")
            + (f" ({self.seeds_with_mean(q)}/{n})" if n > 1 else "")
            for q in QUANTITIES
        }

    def to_dict(self) -> dict[str, Any]:
        """The row in the summary format (``ablate --summary-json``)."""
        return {
            "variant": self.row.name,
            "table": self.row.table,
            "label": self.row.label,
            "here": self.row.here,
            "seeds": list(self.seeds),
            "perplexity": list(self.perplexity),
            "sink_ratio": list(self.sink_ratio),
            "spike": list(self.spike),
            "first_token_spike_ratio": list(self.first_token_spike_ratio),
            "peak_sink_ratio": list(self.peak_sink_ratio),
            "paper": self.paper,
            "ours": self.ours,
            "agrees": self.agrees,
            "by_seed": {q: list(v) for q, v in self.by_seed.items()},
            "steady": self.steady,
        }


QUANTITIES = ("sink_ratio", "spike")


def seed_mean(values: tuple[float, ...]) -> float:
    """The mean over seeds of the values that are not NaN (NaN when none is)."""
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


@dataclass(frozen=True, repr=False)
class PaperComparison(Result):
    """Our ablation table beside the paper's Tables 3–8, row by row."""

    rows: tuple[Comparison, ...]
    """The paper rows our table trained, in the paper's order (the baseline first)."""
    settings: str
    """Our training settings, in one line."""
    skipped: tuple[str, ...] = ()
    """Rows of our table that are not paper rows (not compared)."""
    not_hosted: tuple[str, ...] = ()
    """Paper rows our size cannot host (see :meth:`PaperRow.unfit`)."""
    missing: tuple[str, ...] = ()
    """Paper rows our size hosts that the table has not trained yet (a table built over
    several sittings)."""

    @property
    def compared(self) -> tuple[Comparison, ...]:
        """Every row but the baseline, the reference the others are compared with."""
        return tuple(r for r in self.rows if r.row.name != "baseline")

    @property
    def agreement(self) -> dict[str, float]:
        """Share of the non-baseline rows whose direction agrees, per quantity."""
        return {q: _ratio(agree, n) for q, (agree, _, n) in self.agreeing_rows().items()}

    @property
    def agreement_every_seed(self) -> dict[str, float]:
        """Share of the non-baseline rows that agree and whose every seed moves as the mean."""
        return {q: _ratio(steady, n) for q, (_, steady, n) in self.agreeing_rows().items()}

    def agreeing_rows(self) -> dict[str, tuple[int, int, int]]:
        """Per quantity: (rows that agree, of them in every seed, rows compared)."""
        rows = self.compared
        return {
            q: (
                sum(r.agrees[q] for r in rows),
                sum(r.agrees[q] and r.steady[q] for r in rows),
                len(rows),
            )
            for q in QUANTITIES
        }

    @property
    def several_seeds(self) -> bool:
        """Whether any row has more than one seed (only then do seeds split)."""
        return any(len(r.seeds) > 1 for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The summary JSON: one dict per row (see :meth:`Comparison.to_dict`) and the rules."""
        return json_clean(
            {
                "rows": [r.to_dict() for r in self.rows],
                "agreement": self.agreement,
                "agreement_every_seed": self.agreement_every_seed,
                "threshold": THRESHOLD,
                "sink_floor": SINK_FLOOR,
                "paper_baseline": PAPER_BASELINE,
                "settings": self.settings,
                "skipped": list(self.skipped),
                "not_hosted": list(self.not_hosted),
                "missing": list(self.missing),
            }
        )

    def __str__(self) -> str:
        header = ["table", "row (paper)", "seeds", "ppl", "sink ratio", "peak sink", "Spike",
                  "sink: paper/ours", "Spike: paper/ours"]  # fmt: skip
        body = []
        for r in self.rows:
            marks = r.marks()
            body.append(
                [
                    "all" if r.row.name == "baseline" else str(r.row.table),
                    r.row.label,
                    str(len(r.seeds)),
                    f"{seed_mean(r.perplexity):.2f}",
                    f"{seed_mean(r.sink_ratio):.3f}",
                    f"{seed_mean(r.peak_sink_ratio):.3f}",
                    f"{seed_mean(r.spike):.1f}",
                    marks["sink_ratio"],
                    marks["spike"],
                ]
            )
        share, every = self.agreement, self.agreement_every_seed
        return "\n".join(
            [
                f"the paper's Tables 3-8 beside ours ({self.settings})",
                "",
                *text_table(header, body),
                "",
                f"agreement over {len(self.rows) - 1} rows: sink ratio "
                f"{share['sink_ratio']:.0%}, Spike {share['spike']:.0%}. ↑/↓: a change of more "
                f"than {THRESHOLD:.0%} of the baseline's value (sink ratio: and over "
                f"{SINK_FLOOR:g}), ≈ otherwise; ours are means over seeds. Peak sink: the "
                "highest sink ratio along each run's curve (far above the end: sinks that faded).",
                *(
                    [
                        f"{SEEDS_MARK} Agreeing in every seed: sink ratio "
                        f"{every['sink_ratio']:.0%}, Spike {every['spike']:.0%}."
                    ]
                    if self.several_seeds
                    else []
                ),
                *(
                    [f"not hosted at this size: {', '.join(self.not_hosted)}"]
                    if self.not_hosted
                    else []
                ),
                *([f"not trained yet: {', '.join(self.missing)}"] if self.missing else []),
            ]
        )


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan


def _peak_sink(run: Any) -> float:
    values = [s.sink_ratio for s in run.history if not math.isnan(s.sink_ratio)]
    return max(values, default=math.nan)


def _is_paper(row: Any, config: Any) -> bool:
    known = {r.name: r for r in PAPER_ROWS}
    paper = known.get(row.name)
    return paper is not None and not paper.unfit(config) and paper.variant(config) == row.variant


def compare(table: Any) -> PaperComparison:
    """Our ablation table (trained on :func:`paper_variants`) beside the paper's rows.

    Args:
        table: an :class:`~tl_spikesink.training.ablation.AblationTable` with a "baseline" row.
    """
    from tl_spikesink.training.ablation import settings_line

    # A row counts only if it trained the paper row's own variant (the older miniature rows share
    # some names, e.g. "baseline" with mixed context lengths).
    names = {r.name for r in table.rows if _is_paper(r, table.config)}
    if "baseline" not in names:
        raise SpikeSinkError(
            "the comparison needs the paper's 'baseline' row (directions are changes from it): "
            "train it with the others (ablation_study(['paper:baseline', ...]))"
        )
    base = table.row("baseline")
    reference = {
        "sink_ratio": seed_mean(base.stat("sink_ratio").values),
        "spike": seed_mean(base.stat("max_abs").values),
    }
    rows = []
    for paper in PAPER_ROWS:
        if paper.name not in names:
            continue
        ours = table.row(paper.name)
        values = {
            "sink_ratio": ours.stat("sink_ratio").values,
            "spike": ours.stat("max_abs").values,
        }
        rows.append(
            Comparison(
                row=paper,
                seeds=tuple(run.config.seed for run in ours.runs),
                perplexity=ours.stat("perplexity").values,
                sink_ratio=values["sink_ratio"],
                spike=values["spike"],
                first_token_spike_ratio=ours.stat("bos_spike_ratio").values,
                peak_sink_ratio=tuple(_peak_sink(run) for run in ours.runs),
                ours={q: direction(seed_mean(values[q]), reference[q], q) for q in QUANTITIES},
                by_seed={
                    q: tuple(direction(v, reference[q], q) for v in values[q]) for q in QUANTITIES
                },
            )
        )
    skipped = tuple(sorted(r.name for r in table.rows if r.name not in names))
    unfit = {r.name for r in PAPER_ROWS if r.unfit(table.config)}
    return PaperComparison(
        tuple(rows),
        settings_line(table),
        skipped,
        not_hosted=tuple(r.name for r in PAPER_ROWS if r.name in unfit),
        missing=tuple(r.name for r in PAPER_ROWS if r.name not in names | unfit),
    )


__all__ = [
    "PAPER_BASELINE",
    "PAPER_ROWS",
    "Comparison",
    "PaperComparison",
    "PaperRow",
    "compare",
    "direction",
    "paper_row",
    "paper_variants",
    "same_bar",
    "seed_mean",
]
