"""Mechanism: why spikes happen and why they become attention sinks, as checks on any model.

Each analysis takes the spike tokens' defining layer, channels and cut, and the sink heads, from a
:class:`~tl_spikesink.ScanResult` (running :func:`tl_spikesink.probes.scan` when none is given), then
runs a few forward passes with read-only hooks over a small corpus (default 1,024 tokens) and
returns a frozen result. A token is a *spike token* in these passes when |resid_post| at the
*spike layer* exceeds the scan's massive-activation cut in one of the scan's spike channels; the
spike layer is the layer of the step-up block, the block whose own output writes at least half
of the spike (:func:`spike_site`, the one rule every analysis uses). Where no block does, the
analyses that need one raise :class:`~tl_spikesink.probes.site.NoStepUpBlock`.

Links of the chain, each a reconstruction (see docs/definitions.md):

1. **SiLU regime** (:func:`silu_regime`): in the spike layer's MLP, spike tokens drive a few gate
   neurons so hard that SiLU(z) ≈ z over the whole gate vector: cos(z, SiLU z) ≈ 1 and
   ‖SiLU z‖/‖z‖ ≈ 1, while ordinary tokens lose their negative half.
2. **Quadratic form** (:func:`quadratic_form`): where SiLU(z) ≈ z, output channel k of a gated MLP
   is y_k ≈ x̂ᵀ S_k x̂ + c_k with S_k = ½ Σ_j W_out[j,k] (g_j u_jᵀ + u_j g_jᵀ), x̂ the normalized
   input, g_j / u_j the gate / up columns (times the RMSNorm weight γ when it is not folded) and
   c_k = Σ_j b_in[j] W_out[j,k] + b_out[k]. The eigenvector of the eigenvalue of largest |λ| is
   the *trigger direction*; spike tokens' x̂ should align with it.
3. **Near-constant representations** (:func:`representations`): RMSNorm fixes ‖x̂/γ‖ = √d, so a
   coordinate cannot exceed √d·|γ_i|; once a spike dominates, x̂ puts nearly all its energy in
   the spike channels and different spike tokens normalize to nearly the same vector.
4. **Sink geometry** (:func:`sink_geometry`): near-identical inputs give near-identical keys (one
   direction carries their energy), and sink heads give the first-token key a large logit gap
   over the other keys.
5. **Short-range bias** (:func:`locality`): the share of sink heads' non-sink attention inside a
   recent window vs the other heads of their layers, and the causal window test; the older
   attention-distance metric of ours stays as :func:`short_range` (read from the scan).
6. **Head decomposition** (:func:`head_decomposition`): a layer's attention output is a sum over
   heads; the part of each head's output that flows from the sink tokens' values is small, so
   sink heads write little at ordinary tokens (near no-ops).
7. **Why first tokens and delimiters** (:func:`first_tokens`): Eq. 22's static map, delimiter
   self-sinking and the embedding–gain cosine (§3.1.3).

Beside the chain, from the neighbouring work: :func:`super_weights` (Yu et al. 2024) and
:func:`compression_valleys` (Queipo-de-Llano et al. 2025).

Every hook is read-only, added through ``model.hooks`` (which removes exactly what it added, also
on error) and run under ``torch.inference_mode``; no parameter is touched. Analyses that need a
component the model lacks raise :class:`SpikeSinkError` naming it; :mod:`tl_spikesink.mechanism.claims`
turns those into "not applicable" rows.
"""

from tl_spikesink.mechanism.attention import ShortRange, SinkGeometry, short_range, sink_geometry
from tl_spikesink.mechanism.captures import DEFAULT_MAX_TOKENS, SpikeSite, Texts, spike_site
from tl_spikesink.mechanism.first_tokens import FirstTokens, first_tokens
from tl_spikesink.mechanism.heads import HeadDecomposition, head_decomposition
from tl_spikesink.mechanism.locality import Locality, locality
from tl_spikesink.mechanism.mlp import (
    QuadraticForm,
    SiluRegime,
    all_frobenius,
    quadratic_form,
    quadratic_matrix,
    silu_regime,
)
from tl_spikesink.mechanism.representations import Representations, representations
from tl_spikesink.mechanism.super_weights import SuperWeight, SuperWeights, super_weights
from tl_spikesink.mechanism.valleys import Valleys, compression_valleys, matrix_entropy

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "FirstTokens",
    "HeadDecomposition",
    "Locality",
    "Texts",
    "QuadraticForm",
    "Representations",
    "ShortRange",
    "SiluRegime",
    "SinkGeometry",
    "SpikeSite",
    "SuperWeight",
    "SuperWeights",
    "Valleys",
    "all_frobenius",
    "compression_valleys",
    "first_tokens",
    "head_decomposition",
    "locality",
    "matrix_entropy",
    "quadratic_form",
    "quadratic_matrix",
    "representations",
    "short_range",
    "silu_regime",
    "sink_geometry",
    "spike_site",
    "super_weights",
]
