"""Our ablation table beside the paper's Tables 3–8, as Markdown for a README or a paper.

``tl-spikesink ablate --load FILE --markdown OUT`` writes it.

A pure view of a :class:`~tl_spikesink.training.tables.PaperComparison`: means over seeds, the
sink ratio with each seed's, and the paper's direction beside ours.
"""

from __future__ import annotations

from tl_spikesink.training.tables import (
    QUANTITIES,
    SEEDS_MARK,
    Comparison,
    PaperComparison,
    seed_mean,
)

_LABELS = {"sink_ratio": "sink ratio", "spike": "Spike"}


def to_markdown(comparison: PaperComparison) -> str:
    """The table, one row per trained paper row, and a line with the agreement counts."""
    seeds = sorted({s for r in comparison.rows for s in r.seeds})
    header = (
        "| table | row | held-out ppl | sink ratio (seeds "
        + " / ".join(map(str, seeds))
        + ") | peak sink ratio | Spike | BOS spike/med | sink: paper / ours | Spike: paper / ours |"
    )
    lines = [header, "|" + "---|" * 9]
    lines += [_row(r, tuple(seeds)) for r in comparison.rows]
    counts = comparison.agreeing_rows()
    every = comparison.several_seeds

    def share(q: str, noun: str = "") -> str:
        agree, steady, n = counts[q]
        return f"{agree} of {n}{noun}" + (f" ({steady} in every seed)" if every else "")

    lines += [
        "",
        f"The Spike moves as the paper's does in {share('spike', ' rows')}, the sink ratio in "
        f"{share('sink_ratio')}." + (f" {SEEDS_MARK}" if every else ""),
    ]
    if comparison.not_hosted:
        lines.append(f"Not hosted at this size: {', '.join(comparison.not_hosted)}.")
    if comparison.missing:
        lines.append(f"Not trained yet: {', '.join(comparison.missing)}.")
    return "\n".join(lines) + "\n"


def _row(r: Comparison, every_seed: tuple[int, ...]) -> str:
    base = r.row.name == "baseline"
    marks = [r.marks(" / ")[q] for q in QUANTITIES]
    seeds = " / ".join(f"{v:.3f}" for v in r.sink_ratio)
    if tuple(r.seeds) != every_seed:  # a table read part-way: say which seeds these are
        seeds += f"; seed{'s' if len(r.seeds) > 1 else ''} " + ", ".join(map(str, r.seeds))
    cells = [
        "–" if base else str(r.row.table),
        f"{r.row.label}; here {r.row.here}" if r.row.here else r.row.label,
        f"{seed_mean(r.perplexity):.1f}",
        f"{seed_mean(r.sink_ratio):.3f} ({seeds})",
        f"{seed_mean(r.peak_sink_ratio):.3f}",
        f"{seed_mean(r.spike):.0f}",
        f"{seed_mean(r.first_token_spike_ratio):.1f}",
        *marks,
    ]
    return "| " + " | ".join(cells) + " |"


__all__ = ["to_markdown"]
