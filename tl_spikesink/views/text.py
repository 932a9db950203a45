"""Views of a ScanResult that need no plotting library: the JSON report and the text summary."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tl_spikesink.anatomy import paper_block
from tl_spikesink.probes.spikes import SPIKE_DEFINITION
from tl_spikesink.views.format import block_events, json_clean, layer_list, num, pct

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult
    from tl_spikesink.probes.spikes import SpikeStats

_SHOWN_TOKENS = 10


def token_json(t: Any, **extra: Any) -> dict[str, Any]:
    """A spike or sink token as the report writes it: where it is, what it is, then `extra`."""
    where = t.token
    return {"text_index": where.text_index, "start": where.start, "position": where.position,
            "token": t.text, "token_id": t.token_id,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in extra.items()}}  # fmt: skip


def to_dict(r: ScanResult) -> dict[str, Any]:
    """The JSON report of a scan (all settings and the corpus fingerprint included)."""
    s, k = r.spikes, r.sinks
    layers = []
    for layer in range(r.n_layers):
        row: dict[str, Any] = {"layer": layer}
        for site in s.sites:
            row[f"{site}_top"] = s.top(site, 3)[layer]
            row[f"{site}_median"] = float(s.median(site)[layer])
        layers.append(row)
    events = [
        {
            "kind": kind,
            "layer": layer,
            "component": comp,
            "paper_block": paper_block(layer, comp),
            "count": n,
        }
        for kind, counter in s.lifecycle.items()
        for (layer, comp), n in sorted(counter.items())
    ]
    steps = {
        kind: [
            {
                "layer": layer,
                "component": comp,
                "paper_block": paper_block(layer, comp),
                "events": n,
                "largest": s.lifecycle_peaks[kind][(layer, comp)],
            }
            for (layer, comp), n in sorted(counter.items())
        ]
        for kind, counter in s.lifecycle.items()
    }
    ratio, ratio_layer = _max_ratio(s)
    return json_clean(
        {
            "model": r.model,
            "prepend_bos": r.prepend_bos,
            "n_layers": r.n_layers,
            "n_heads": r.n_heads,
            "d_model": r.d_model,
            "n_tokens": r.n_tokens,
            "n_sequences": r.n_sequences,
            "corpus": list(r.corpus),
            "config": dataclasses.asdict(r.config),
            "environment": r.environment,
            "layers": layers,
            "spikes": {
                "abs_threshold": s.abs_threshold,
                "rel_threshold": s.rel_threshold,
                "channels": list(s.channels),
                "spike": s.spike,
                "spike_definition": SPIKE_DEFINITION,
                "max_top1_over_median": ratio,
                "max_top1_over_median_layer": ratio_layer,
                "tokens": [
                    token_json(t, max_value=t.max_value, channels=t.channels, layers=t.layers)
                    for t in s.tokens
                ],
                "massive_layers": list(s.massive_layers),
                "step_up_layers": list(s.step_up_layers),
                "step_down_layers": list(s.step_down_layers),
                "step_up": steps["step_up"],
                "step_down": steps["step_down"],
                "lifecycle": events,
                "share_first": s.share_first,
                "share_delimiter": s.share_delimiter,
                "truncated": s.truncated,
            },
            "kurtosis": _kurtosis_json(r),
            "sinks": {
                "epsilon": k.epsilon,
                "scores": k.scores,
                "sink_ratio": k.sink_ratio,
                "sink_ratio_definition": k.sink_ratio_definition,
                "sink_ratio_per_layer": k.sink_ratio_per_layer,
                "sink_ratio_per_head": k.sink_ratio_per_head,
                "sink_ratio_sequences": k.n_ratio_sequences,
                "sink_probe_len": k.probe_len,
                "sink_min_len": k.min_len,
                "first_token_sink_ratio": k.first_token_sink_ratio,
                "first_token_sink_ratio_definition": k.first_token_sink_ratio_definition,
                "first_token_sink_ratio_per_layer": k.first_token_sink_ratio_per_layer,
                "sink_heads": [list(h) for h in k.sink_heads],
                "row_mass": k.row_mass,
                "sink_token_share": k.sink_token_share,
                "tokens": [token_json(t, share=t.share) for t in k.tokens],
                "share_first": k.share_first,
                "share_delimiter": k.share_delimiter,
                "also_spike_tokens": r.sink_spike_overlap,
            },
        }
    )


def summary(r: ScanResult) -> str:
    """The text summary `print(result)` and the CLI show."""
    s, k = r.spikes, r.sinks
    lines = [
        f"tl_spikesink scan of {r.model}: {r.n_tokens:,} tokens in {r.n_sequences:,} sequences "
        f"(prepend_bos={r.prepend_bos}; corpus {', '.join(c['name'] for c in r.corpus)})",
        "",
        f"SPIKES  |x| > {num(s.abs_threshold)} and > {num(s.rel_threshold)} x layer median, "
        "hook_resid_post",
        f"  spike channels   {', '.join(map(str, s.channels[:8])) or 'none'}",
        f"  massive layers   {layer_list(s.massive_layers)}",
        f"  step-up blocks   {block_events(s.lifecycle['step_up'], 'created')}",
        f"  step-down blocks {block_events(s.lifecycle['step_down'], 'cancelled')}",
        f"  spike tokens     {len(s.tokens)} ({token_shares(s)})",
    ]
    if s.truncated:
        lines.append("  (some layer had more candidates than max_candidates; raise it to see all)")
    for t in s.tokens[:_SHOWN_TOKENS]:
        lines.append(
            f"    text {t.token.text_index:>4} pos {t.token.position:>4} {t.text!r:<12} "
            f"{num(t.max_value):>9}  channels {','.join(map(str, t.channels))}"
        )
    ratio, ratio_layer = _max_ratio(s)
    at = "" if ratio_layer is None else f" at layer {ratio_layer}"
    lines += [
        "",
        f"  Spike            {num(s.spike)} (largest |x| in the spike channels, any layer: the "
        f"paper's 'Spike'); max top1/median {num(ratio)}{at}",
        "  layer      top1      top2      top3    median   top1/median",
    ]
    tops, med = s.top("resid_post", 3), s.median("resid_post")
    for layer in range(r.n_layers):
        a, b, c = tops[layer].tolist()
        m = float(med[layer])
        ratio = a / m if m else float("nan")
        lines.append(
            f"  {layer:>5} {num(a):>9} {num(b):>9} {num(c):>9} {num(m):>9} {num(ratio):>13}"
        )
    lines += _kurtosis_line(r)
    heads = sorted(k.sink_heads, key=lambda lh: -float(k.scores[lh]))
    lines += [
        "",
        f"SINKS  eps = {k.epsilon}",
        f"  sink ratio       {num(k.sink_ratio)} (Eq. 28, {k.n_ratio_sequences:,} sequences: mean "
        f"share of heads with alpha_k > eps at some key k < T/2,",
        f"                   alpha_k over the first T = min(n, {k.probe_len}) queries; T < "
        f"{k.min_len} left out)",
        f"  first-token      {num(k.first_token_sink_ratio)} ({len(k.sink_heads)} of "
        f"{r.n_layers * r.n_heads} heads with corpus-pooled first-token score alpha_0 > eps)",
        "  top sink heads   "
        + (
            ", ".join(f"L{layer}H{h} {float(k.scores[layer, h]):.2f}" for layer, h in heads[:8])
            or "none"
        ),
        f"  sink tokens      {len(k.tokens)} ({token_shares(k)}; "
        f"{pct(r.sink_spike_overlap)} are also spike tokens)",
    ]
    return "\n".join(lines)


def _kurtosis_json(r: ScanResult) -> dict[str, Any] | None:
    if r.kurtosis is None:
        return None
    from tl_spikesink.probes.kurtosis import excess_kurtosis

    d = excess_kurtosis(r).to_dict()
    return {k: v for k, v in d.items() if k not in ("model", "corpus")}


def _kurtosis_line(r: ScanResult) -> list[str]:
    if r.kurtosis is None:
        return []
    from tl_spikesink.probes.kurtosis import excess_kurtosis

    k = excess_kurtosis(r)
    return [
        f"  kurtosis         peak {num(float(k.per_layer[k.peak_layer]))} at layer "
        f"{k.peak_layer}, mean {num(k.mean)}; without spike tokens: mean "
        f"{num(k.mean_without_spikes)} (OSP excess kurtosis over d_model, per token)"
    ]


def token_shares(stats: Any) -> str:
    """Shares of spike or sink tokens that are first tokens and delimiters (they overlap)."""
    return (
        f"first token {pct(stats.share_first)}, delimiters {pct(stats.share_delimiter)}; "
        "a first token that is a delimiter counts in both"
    )


def _max_ratio(s: SpikeStats) -> tuple[float, int | None]:
    """Largest resid_post top-1 / median |x| over layers, and its layer (NaN, None: none)."""
    ratio = s.top("resid_post", 1)[:, 0] / s.median("resid_post")
    ratio = ratio.where(ratio.isfinite(), float("nan"))
    if bool(ratio.isnan().all()):
        return float("nan"), None
    layer = int(ratio.nan_to_num(-1.0).argmax())
    return float(ratio[layer]), layer
