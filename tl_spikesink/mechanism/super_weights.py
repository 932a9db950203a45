"""Super weights (Yu et al. 2024): the single MLP weights that create the massive activations.

Yu et al.'s rule, on one prompt: in every layer, take the largest |input| of the MLP's output
projection (``mlp.hook_post``, neuron i) and its largest |output| (``hook_mlp_out``, channel o);
when both exceed 50, W_out[i, o] is a super weight. Reported as HF does, ``row`` = output channel
o, ``col`` = input neuron i, with ``value`` = W_out[i, o] (TransformerLens orientation).

On a pre-norm model the rule also fires where late blocks write the spike's cancellation, which
users of the original script report as extra candidates. Each candidate is therefore given a
``role`` from the scan's lifecycle (its block is a step-up block, a step-down block, or neither)
and the ranking puts step-up weights first, then by |output|. The corpus version counts, over
every sequence of a corpus, how often each candidate is its layer's (input, output) argmax.

The top candidate is tested the paper's way on the given texts: perplexity clean, with the
weight pruned, and pruned with the super activation restored
(:func:`~tl_spikesink.interventions.weights.super_weight_edit`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy, block_hook, hook_name, paper_block
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import DEFAULT_MAX_TOKENS, Texts, as_corpus, scan_of
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.results import Result
from tl_spikesink.views.format import json_clean, num, text_table

PROMPT = "Apple Inc. is a worldwide tech company."
"""The prompt of Yu et al.'s finder."""
THRESHOLD = 50.0


@dataclass(frozen=True)
class SuperWeight:
    """One candidate: layer, output channel `row`, input neuron `col`, the weight, its role."""

    layer: int
    row: int
    col: int
    value: float
    max_input: float
    max_output: float
    role: str
    """"step-up", "step-down" or "other" (the block's part in the scan's spike lifecycle)."""
    sequences: int
    """Corpus sequences in which (col, row) is the layer's argmax pair with both above the cut."""


@dataclass(frozen=True, repr=False)
class SuperWeights(Result):
    """Ranked super-weight candidates and the perplexity test of the top one."""

    model: str
    prompt: str
    threshold: float
    candidates: tuple[SuperWeight, ...]
    n_sequences: int
    ppl_clean: float
    ppl_pruned: float
    ppl_pruned_restored: float
    corpus: tuple[dict[str, Any], ...]
    ppl_scaled: tuple[tuple[float, float], ...] = ()
    """(scale, perplexity) with the top weight multiplied by each scale (Yu et al.'s sweep)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``super_weights`` (ranked) and the three perplexities."""
        return json_clean(
            {
                "model": self.model,
                "prompt": self.prompt,
                "threshold": self.threshold,
                "super_weights": [
                    {
                        "layer": c.layer,
                        "paper_block": paper_block(c.layer, "mlp"),
                        "row": c.row,
                        "col": c.col,
                        "value": c.value,
                        "max_input": c.max_input,
                        "max_output": c.max_output,
                        "role": c.role,
                        "sequences": c.sequences,
                    }
                    for c in self.candidates
                ],
                "n_sequences": self.n_sequences,
                "ppl_clean": self.ppl_clean,
                "ppl_pruned": self.ppl_pruned,
                "ppl_pruned_restored": self.ppl_pruned_restored,
                "ppl_scaled": [{"scale": s, "perplexity": p} for s, p in self.ppl_scaled],
                "corpus": list(self.corpus),
            }
        )

    def __str__(self) -> str:
        head = ["layer", "block", "row (out)", "col (in)", "value", "|in|", "|out|", "role", "seqs"]
        body = [
            [str(c.layer), str(paper_block(c.layer, "mlp")), str(c.row), str(c.col),
             num(c.value), num(c.max_input), num(c.max_output), c.role,
             f"{c.sequences}/{self.n_sequences}"]
            for c in self.candidates
        ]  # fmt: skip
        lines = [
            f"super weights of {self.model} (|input| and |output| > {num(self.threshold)} on "
            f"{self.prompt!r}; ranked step-up first)",
            *text_table(head, body),
        ]
        if self.candidates:
            top = self.candidates[0]
            lines.append(
                f"top ({top.layer}, {top.row}, {top.col}): perplexity clean "
                f"{num(self.ppl_clean)}, pruned {num(self.ppl_pruned)}, pruned with the super "
                f"activation restored {num(self.ppl_pruned_restored)}"
            )
            if self.ppl_scaled:
                sweep = ", ".join(f"× {num(s)}: {num(p)}" for s, p in self.ppl_scaled)
                lines.append(f"  perplexity with the weight scaled {sweep}")
        return "\n".join(lines)


class _Extremes(Probe):
    """Per layer and sequence: the largest |MLP input| and |MLP output|, and where they are."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.rows: list[dict[int, tuple[Any, ...]]] = []
        """Per sequence: {layer: (max |input|, its neuron, max |output|, its channel)}."""

    def hooks(self) -> list[tuple[str, HookFn]]:
        out: list[tuple[str, HookFn]] = []
        for layer in range(self.n_layers):
            out.append((block_hook(layer, "mlp.hook_post"), self._hook(layer, 0)))
            out.append((hook_name("mlp_out", layer), self._hook(layer, 1)))
        return out

    def start_batch(self, step: Step) -> None:
        self.mask = step.mask
        self.batch: dict[int, list[Any]] = {}

    def _hook(self, layer: int, which: int) -> HookFn:
        def hook(x: torch.Tensor, hook: Any) -> None:
            a = (x.detach().abs().float() * self.mask[..., None]).amax(1)  # [batch, channel]
            value, channel = a.max(-1)
            self.batch.setdefault(layer, [None, None])[which] = (value.cpu(), channel.cpu())

        return hook

    def end_batch(self, step: Step, logits: Any = None) -> None:
        for b in range(step.mask.shape[0]):
            self.rows.append(
                {
                    layer: (float(i[0][b]), int(i[1][b]), float(o[0][b]), int(o[1][b]))
                    for layer, (i, o) in self.batch.items()
                }
            )


def _extremes(model: Any, corpus: Any, n_layers: int) -> list[dict[int, tuple[Any, ...]]]:
    probe = _Extremes(n_layers)
    run(model, corpus, [probe], batch_size=8, progress=False)
    return probe.rows


def super_weights(
    model: Any,
    texts: Texts | None = None,
    scan: Any = None,
    *,
    prompt: str = PROMPT,
    threshold: float = THRESHOLD,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    evaluate: bool = True,
    scales: Sequence[float] = (),
    progress: bool = True,
) -> SuperWeights:
    """Find super weights by Yu et al.'s rule, rank them, and test the top one (module docstring).

    Args:
        model: a pre-norm TransformerLens model with an MLP in every block; only read.
        texts: the corpus for the corpus counts and the perplexities (default corpus if None).
        scan: the model's scan, for each candidate's role (run on `texts` if None).
        prompt: the one prompt the rule reads.
        threshold: the cut on |input| and |output| (Yu et al.: 50).
        max_tokens: tokens of `texts` read.
        evaluate: run the three perplexities of the top candidate.
        scales: also the perplexity with the top weight multiplied by each of these (Yu et al.
            sweep 0 … 3; 1 is the clean model), in the same pass over the corpus.
        progress: show a progress bar over the perplexity passes.
    """
    from tl_spikesink.corpus import default_texts, tokenize
    from tl_spikesink.evaluation.scoring import evaluate_all
    from tl_spikesink.interventions.weights import super_weight_edit

    a = Anatomy.of(model)
    if not math.isfinite(threshold) or threshold <= 0:
        raise SpikeSinkError(f"threshold must be a positive number, got {threshold}")
    scales = tuple(float(s) for s in scales)
    if not all(math.isfinite(s) for s in scales):
        raise SpikeSinkError(f"scales must be finite numbers, got {scales}")
    if scales and not evaluate:
        raise SpikeSinkError("scales= needs evaluate=True (the sweep is a perplexity test)")
    missing = [n for n in (block_hook(0, "mlp.hook_post"), hook_name("mlp_out", 0))
               if n not in model.hook_dict]  # fmt: skip
    if missing:
        raise SpikeSinkError(
            f"super_weights needs the hook point {missing[0]!r}; this model lacks it"
        )
    corpus = as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = scan_of(model, corpus, scan)
    life = scan.spikes.lifecycle
    up = {la for la, c in life["step_up"] if c == "mlp"}
    down = {la for la, c in life["step_down"] if c == "mlp"}
    (one,) = _extremes(model, tokenize(model, [prompt], name="prompt"), a.n_layers)
    counts: Counter[tuple[int, int, int]] = Counter()
    rows = _extremes(model, corpus, a.n_layers)
    for seq in rows:
        for layer, (vin, i, vout, o) in seq.items():
            if vin > threshold and vout > threshold:
                counts[layer, o, i] += 1
    candidates = []
    for layer, (vin, i, vout, o) in sorted(one.items()):
        if vin > threshold and vout > threshold:
            role = "step-up" if layer in up else "step-down" if layer in down else "other"
            value = float(model.blocks[layer].mlp.W_out[i, o].detach())
            candidates.append(SuperWeight(layer, o, i, value, vin, vout, role, counts[layer, o, i]))
    order = {"step-up": 0, "other": 1, "step-down": 2}
    candidates.sort(key=lambda c: (order[c.role], -c.max_output))
    ppl = [float("nan")] * (3 + len(scales))
    if evaluate and candidates:
        top = candidates[0]
        ivs = [
            super_weight_edit(model, top.layer, top.row, top.col),
            super_weight_edit(model, top.layer, top.row, top.col, restore_above=threshold),
            *(super_weight_edit(model, top.layer, top.row, top.col, scale=s) for s in scales),
        ]
        from tl_spikesink.config import ScanConfig

        results = evaluate_all(model, corpus, [None, *ivs], config=ScanConfig(), progress=progress)
        ppl = [r.perplexity for r in results]
    return SuperWeights(
        model=a.model_name,
        prompt=prompt,
        threshold=threshold,
        candidates=tuple(candidates),
        n_sequences=len(rows),
        ppl_clean=ppl[0],
        ppl_pruned=ppl[1],
        ppl_pruned_restored=ppl[2],
        corpus=(corpus.describe(),),
        ppl_scaled=tuple(zip(scales, ppl[3:], strict=True)),
    )


__all__ = ["PROMPT", "THRESHOLD", "SuperWeight", "SuperWeights", "super_weights"]
