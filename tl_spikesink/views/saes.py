"""Text tables of SAE reports: one report by token class, and several SAEs side by side."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tl_spikesink.views.format import num, pct, signed, text_table

if TYPE_CHECKING:
    from tl_spikesink.saes.evaluation import SAEReport

_RUN_LABELS = {
    "zero": "activation zeroed",
    "sae": "SAE everywhere",
    "spike_only": "SAE at spike tokens only",
    "sink_only": "SAE at sink tokens only",
    "bypass": "SAE except at spike & sink tokens",
}


def render_report(r: SAEReport) -> str:
    """The text table ``print(report)`` shows."""
    from tl_spikesink.saes.evaluation import GROUPS

    header = ["tokens", "n", "MSE", "expl. var.", "L0", "Δloss (SAE)", "err in spike ch."]
    rows = [
        [
            g,
            f"{r.n(g):,}",
            num(r.mse(g)),
            pct(r.explained_variance(g)),
            num(r.l0(g)),
            signed(r.delta_loss("sae", g)) if "sae" in r.runs else "-",
            pct(r.spike_channel_error_share(g)),
        ]
        for g in GROUPS
    ]
    c = r.corpus[0]
    n_tokens = sum(x["n_tokens"] for x in r.corpus)
    out = [
        f"SAE report: {r.sae['class']} ({r.sae['d_in']} -> {r.d_sae} latents) at {r.hook} "
        f"of {r.model}",
        f"  corpus {c['name']!r}{' + more' if len(r.corpus) > 1 else ''}: {n_tokens:,} tokens; "
        f"spike channels {', '.join(map(str, r.spike_channels)) or 'none'}",
        "",
        *text_table(header, rows),
        "",
        "normal = delimiter + other; sink = sink tokens that are not spike tokens "
        f"({r.n_sink_spike:,} sink tokens are also spike tokens);",
        "Δloss: loss with the SAE spliced in everywhere minus clean, at positions of that class.",
        f"latents: {r.d_sae:,}, dead on this corpus {r.dead_latents:,} "
        f"({pct(r.dead_latents / r.d_sae)})",
    ]
    clean = r.loss("clean")
    out.append(f"next-token loss: clean {num(clean)}")
    for run in r.runs[1:]:
        rec = "" if run == "zero" else f", loss recovered {pct(r.loss_recovered(run))}"
        out.append(f"  {_RUN_LABELS[run]}: {num(r.loss(run))} ({signed(r.delta_loss(run))}{rec})")
    for g in ("spike", "sink"):
        top = r.firing_latents(g, 5)
        if top:
            shown = ", ".join(f"#{i} ({pct(a)} vs {pct(b)} of normal)" for i, a, b in top)
            out.append(f"latents firing on {g} tokens: {shown}")
    return "\n".join(out)


def compare_reports(reports: Mapping[str, SAEReport]) -> str:
    """Several SAEs' reports side by side (e.g. trained with and without spike tokens)."""
    header = [
        "SAE",
        "EV all",
        "EV normal",
        "EV spike",
        "MSE normal",
        "L0 normal",
        "dead",
        "Δloss",
        "recovered",
        "Δloss spike only",
        "recovered bypass",
        "spike err in spike ch.",
    ]
    rows = []
    for name, r in reports.items():
        has = set(r.runs)
        rows.append(
            [
                name,
                pct(r.explained_variance("all")),
                pct(r.explained_variance("normal")),
                pct(r.explained_variance("spike")),
                num(r.mse("normal")),
                num(r.l0("normal")),
                f"{r.dead_latents:,}/{r.d_sae:,}",
                signed(r.delta_loss("sae")) if "sae" in has else "-",
                pct(r.loss_recovered("sae")) if "sae" in has else "-",
                signed(r.delta_loss("spike_only")) if "spike_only" in has else "-",
                pct(r.loss_recovered("bypass")) if "bypass" in has else "-",
                pct(r.spike_channel_error_share("spike")),
            ]
        )
    return "\n".join(
        [
            *text_table(header, rows),
            "",
            "EV: explained variance (all: pooled over every token, as training logs report it);",
            "normal: tokens neither spike nor sink; dead: latents that never fire on these texts;",
            "Δloss: loss with the SAE spliced in everywhere minus clean (nats); recovered:",
            "(L_zero - L_SAE) / (L_zero - L_clean); bypass: SAE everywhere but at spike and sink",
            "tokens; spike err in spike ch.: share of the squared error on spike tokens that lies",
            "in the spike channels.",
        ]
    )


__all__ = ["compare_reports", "render_report"]
