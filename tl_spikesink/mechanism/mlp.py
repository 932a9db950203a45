"""The spike layer's MLP: SiLU regime and SwiGLU quadratic form (links 1 and 2).

SiLU regime: cos(z, act(z)) and ‖act(z)‖/‖z‖ of the gate pre-activation z = ``mlp.hook_pre``;
spike tokens drive a few gate neurons so hard that act(z) ≈ z, at the step-up block and (paper
Fig. 2) at the step-down blocks too (``silu_regime(..., layer=L)``).

Quadratic form (the paper's Eq. 16–17, written in TransformerLens's orientation): where SiLU(z) ≈ z, output channel k of
a gated MLP is y_k ≈ x̂ᵀ S_k x̂ + c_k with S_k = ½ Σ_j W_out[j,k] (g_j u_jᵀ + u_j g_jᵀ), x̂ =
``ln2.hook_normalized`` and g_j / u_j the columns of W_gate / W_in (times ln2's γ when the norm
is not folded), c_k = Σ_j b_in[j] W_out[j,k] + b_out[k]. The eigenvector of the largest-|λ|
eigenvalue is the trigger direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float

from tl_spikesink.anatomy import block_hook
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import (
    DEFAULT_MAX_TOKENS,
    TOKENS,
    Captured,
    SpikeSite,
    Texts,
    as_corpus,
    capture,
    group_means,
    mean_or_nan,
    require_gated,
    scan_of,
    spike_mask,
    spike_site,
)
from tl_spikesink.results import Result

# ---------------------------------------------------------------- 1. SiLU regime


@dataclass(frozen=True, repr=False)
class SiluRegime(Result):
    """How close one block's MLP activation (default: the spike layer's) is to the identity."""

    layer: int
    """Block whose MLP was read (the spike layer unless another was asked for)."""
    cosine: Float[torch.Tensor, " token"]
    """cos(z, act(z)) of the gate pre-activation z (``mlp.hook_pre``)."""
    norm_ratio: Float[torch.Tensor, " token"]
    """‖act(z)‖ / ‖z‖."""
    channel: int
    """Spike channel whose writers `linear_share` weighs."""
    linear_share: Float[torch.Tensor, " token"]
    """Share of Σ_j |act(z_j)·u_j·W_out[j, channel]| from neurons with act(z_j)/z_j ≥ 0.9."""
    is_spike: Bool[torch.Tensor, " token"]

    spike_linear_share, other_linear_share = group_means(
        "linear_share", "is_spike", TOKENS, "≈ 1: linear"
    )
    spike_cosine, other_cosine = group_means(
        "cosine", "is_spike", TOKENS, "≈ 1 in the linear regime"
    )
    spike_norm_ratio, other_norm_ratio = group_means("norm_ratio", "is_spike", TOKENS)


def silu_regime(
    model: Any,
    texts: Texts,
    scan: Any = None,
    *,
    layer: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> SiluRegime:
    """Compare the gate pre-activation with its activation in one block's MLP.

    The cosine over the whole gate vector mixes the few neurons that write the spike with
    thousands that do not; `linear_share` weighs each neuron by what it writes into the first
    spike channel, which is the part the quadratic-form reading needs to be linear.

    Spike tokens are always those of the spike site (|resid_post| above the cut at the spike
    layer), so at a step-down block (`layer` after the spike layer) they are the tokens that
    carry the spike into it; the paper (Fig. 2) finds SiLU near the identity there too.

    Args:
        model: a TransformerLens model; only read.
        texts: strings or a :class:`Corpus` (raw texts are cut to `max_tokens`).
        scan: the model's scan; run on `texts` when None.
        layer: the block whose MLP is read (default: the spike layer, the step-up block).
        max_tokens: tokens read from raw texts.

    Returns:
        A :class:`SiluRegime`; `spike_cosine` near 1 means spike tokens see SiLU as the identity.
    """
    corpus = as_corpus(model, texts, max_tokens)
    site = spike_site(scan_of(model, corpus, scan))
    L = site.layer if layer is None else int(layer)
    if not 0 <= L < int(model.cfg.n_layers):
        raise SpikeSinkError(f"layer {L} is out of range (the model has {model.cfg.n_layers})")
    cap = capture(model, corpus, silu_names(model, L, site.layer))
    return silu_from(model, cap, site, L)


def silu_names(model: Any, layer: int, spike_layer: int | None = None) -> list[str]:
    """Hooks :func:`silu_from` reads at `layer`, plus the spike layer's residual (spike tokens)."""
    names = [block_hook(layer, "mlp.hook_pre")]
    if getattr(model.cfg, "gated_mlp", False):
        names.append(block_hook(layer, "mlp.hook_pre_linear"))
    names.append(block_hook(layer if spike_layer is None else spike_layer, "hook_resid_post"))
    return names


def silu_from(model: Any, cap: Captured, site: SpikeSite, layer: int | None = None) -> SiluRegime:
    """The SiLU regime of block `layer` (default: the spike layer) from a capture pass."""
    L = site.layer if layer is None else layer
    z = cap.acts[block_hook(L, "mlp.hook_pre")]
    with torch.inference_mode():
        a = model.blocks[L].mlp.act_fn(z)
    cos = torch.nn.functional.cosine_similarity(z, a, dim=-1)
    ratio = a.norm(dim=-1) / z.norm(dim=-1).clamp(min=1e-12)
    # What each neuron writes into the spike channel; a plain MLP has no up projection (u = 1).
    k = site.channels[0]
    up = cap.acts.get(block_hook(L, "mlp.hook_pre_linear"))
    w_out = model.blocks[L].mlp.W_out.detach().float().cpu()[:, k]
    c = (a * w_out).abs() if up is None else (a * up * w_out).abs()
    # act(z)/z ≥ 0.9 is SiLU's z ≥ ln 9 ≈ 2.2: within 10 % of the identity.
    linear = (z > 0) & (a >= 0.9 * z)
    share = (c * linear).sum(-1) / c.sum(-1).clamp(min=1e-30)
    return SiluRegime(L, cos, ratio, k, share, spike_mask(cap, site))


# ---------------------------------------------------------------- 2. quadratic form


@dataclass(frozen=True, repr=False)
class QuadraticForm(Result):
    """The SwiGLU quadratic form S_k of the spike layer's MLP for each spike channel."""

    layer: int
    channels: tuple[int, ...]
    """Spike channels k analysed (rows of the per-channel tensors)."""
    lambda_star: Float[torch.Tensor, " channel"]
    """Eigenvalue of S_k with the largest |λ|."""
    trigger: Float[torch.Tensor, "channel d_model"]
    """Its unit eigenvector: the trigger direction."""
    frobenius: Float[torch.Tensor, " channel"]
    """‖S_k‖_F (= ‖Λ_k‖_F)."""
    eigenvalues: Float[torch.Tensor, "channel d_model"]
    """The spectrum of each S_k, ascending (paper Fig. 4)."""
    all_frobenius: Float[torch.Tensor, " d_model"]
    """‖S_k‖_F of every output channel k of the MLP (paper Fig. 3)."""
    random_channels: tuple[int, ...]
    random_frobenius: Float[torch.Tensor, " random"]
    """‖S_k‖_F of seeded random non-spike channels, for comparison."""
    random_lambda_share: Float[torch.Tensor, " random"]
    """|λ*| / ‖S_k‖_F of the random channels."""
    alignment: Float[torch.Tensor, "channel token"]
    """|cos(x̂, trigger)| per token."""
    predicted: Float[torch.Tensor, "channel token"]
    """x̂ᵀ S_k x̂ + c_k."""
    actual: Float[torch.Tensor, "channel token"]
    """The MLP's real output in channel k, act(z)·u·W_out[:, k] + b_out[k] from ``mlp.hook_post``
    (before ``ln2_post`` on sandwich-norm models, where ``hook_mlp_out`` is normalized again)."""
    is_spike: Bool[torch.Tensor, " token"]

    @property
    def lambda_share(self) -> Float[torch.Tensor, " channel"]:
        """|λ*| / ‖S_k‖_F: 1 when one eigenvalue carries the whole form."""
        return self.lambda_star.abs() / self.frobenius.clamp(min=1e-30)

    @property
    def spike_alignment(self) -> float:
        """Mean |cos(x̂, trigger)| of spike tokens, first spike channel."""
        return mean_or_nan(self.alignment[0][self.is_spike])

    @property
    def other_alignment(self) -> float:
        """Mean |cos(x̂, trigger)| of the other tokens, first spike channel."""
        return mean_or_nan(self.alignment[0][~self.is_spike])

    @property
    def spike_relative_error(self) -> float:
        """Median |predicted − actual| / |actual| over spike tokens, first spike channel."""
        p, a = self.predicted[0][self.is_spike], self.actual[0][self.is_spike]
        if not a.numel():
            return float("nan")
        return float(((p - a).abs() / a.abs().clamp(min=1e-12)).median())

    @property
    def frobenius_ratio(self) -> float:
        """‖S_k‖_F of the first spike channel over the median of the random channels."""
        if not self.random_frobenius.numel():
            return float("nan")
        median = float(self.random_frobenius.median())
        return float(self.frobenius[0]) / median if median > 0 else math.inf


def quadratic_matrix(
    model: Any, layer: int, channel: int
) -> Float[torch.Tensor, "d_model d_model"]:
    """S_k of block `layer`'s gated MLP for output channel `channel`, in x̂'s basis.

    With an unfolded RMSNorm (``normalization_type="RMS"``) the weight γ of ``ln2`` multiplies the
    gate and up columns; with ``fold_ln`` (``"RMSPre"``) it is already inside them.
    """
    require_gated(model, "the SwiGLU quadratic form")
    mlp = model.blocks[layer].mlp
    with torch.inference_mode():
        g, u = mlp.W_gate.detach().double(), mlp.W_in.detach().double()
        ln = getattr(model.blocks[layer], "ln2", None)
        w = getattr(ln, "w", None)
        if w is not None:
            g, u = g * w.detach().double()[:, None], u * w.detach().double()[:, None]
        wk = mlp.W_out.detach().double()[:, channel]
        s = (g * wk) @ u.T
        return (0.5 * (s + s.T)).float()


def _channel_constant(model: Any, layer: int, channel: int) -> float:
    mlp = model.blocks[layer].mlp
    with torch.inference_mode():
        return float(
            mlp.b_in.detach().double() @ mlp.W_out.detach().double()[:, channel]
            + mlp.b_out[channel]
        )


def quadratic_form(
    model: Any,
    texts: Texts,
    scan: Any = None,
    *,
    n_random: int = 8,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> QuadraticForm:
    """Eigen-analyse S_k for the spike channels and test x̂ᵀS_k x̂ against the MLP's output.

    Args:
        model: a TransformerLens model with a gated MLP; only read.
        texts: strings or a :class:`Corpus`.
        scan: the model's scan; run on `texts` when None.
        n_random: non-spike channels drawn (seeded) for the ‖S_k‖_F comparison.
        seed: seed of that draw.
        max_tokens: tokens read from raw texts.

    Raises:
        SpikeSinkError: the model has no gated MLP, or the scan found no spike.
    """
    require_gated(model, "the SwiGLU quadratic form")
    corpus = as_corpus(model, texts, max_tokens)
    site = spike_site(scan_of(model, corpus, scan))
    L = site.layer
    cap = capture(model, corpus, quadratic_names(L))
    return quadratic_from(model, cap, site, n_random, seed)


def quadratic_names(L: int) -> list[str]:
    """Hooks :func:`quadratic_from` reads at the spike layer `L`."""
    return [
        block_hook(L, "ln2.hook_normalized"),
        block_hook(L, "mlp.hook_post"),
        block_hook(L, "hook_resid_post"),
    ]


def _spectrum(
    model: Any, layer: int, channel: int
) -> tuple[float, torch.Tensor, float, torch.Tensor]:
    """λ* (largest |λ|), its unit eigenvector, ‖S_k‖_F and the ascending spectrum of S_k."""
    vals, vecs = torch.linalg.eigh(quadratic_matrix(model, layer, channel).double())
    i = int(vals.abs().argmax())
    return float(vals[i]), vecs[:, i].float(), float(vals.norm()), vals.float()


def all_frobenius(model: Any, layer: int) -> Float[torch.Tensor, " d_model"]:
    """‖S_k‖_F of every output channel k of block `layer`'s gated MLP, without forming any S_k.

    With A_k = G diag(w_k) Uᵀ (G, U the gate / up columns, w_k = W_out[:, k]) and S_k = ½(A_k +
    A_kᵀ): ‖S_k‖²_F = ½(‖A_k‖²_F + tr A_k²) = ½ w_kᵀ (GᵀG ∘ UᵀU + M ∘ Mᵀ) w_k with M = UᵀG, so
    one d_mlp × d_mlp kernel serves all d_model channels.
    """
    require_gated(model, "the SwiGLU quadratic form")
    mlp = model.blocks[layer].mlp
    with torch.inference_mode():
        g, u = mlp.W_gate.detach().double(), mlp.W_in.detach().double()
        w = getattr(getattr(model.blocks[layer], "ln2", None), "w", None)
        if w is not None:
            g, u = g * w.detach().double()[:, None], u * w.detach().double()[:, None]
        m = u.T @ g
        kernel = (g.T @ g) * (u.T @ u) + m * m.T
        del m
        w_out = mlp.W_out.detach().double()
        sq = 0.5 * ((kernel @ w_out) * w_out).sum(0)
        return sq.clamp(min=0).sqrt().float().cpu()


def quadratic_from(
    model: Any, cap: Captured, site: SpikeSite, n_random: int, seed: int
) -> QuadraticForm:
    require_gated(model, "the SwiGLU quadratic form")
    L, channels = site.layer, site.channels
    x = cap.acts[block_hook(L, "ln2.hook_normalized")]
    post = cap.acts[block_hook(L, "mlp.hook_post")]
    mlp = model.blocks[L].mlp
    lams, trig, frob, align, pred, actual, spectra = [], [], [], [], [], [], []
    for k in channels:
        lam, v, f, vals = _spectrum(model, L, k)
        spectra.append(vals)
        s = quadratic_matrix(model, L, k)
        lams.append(lam)
        trig.append(v)
        frob.append(f)
        align.append((x @ v).abs() / x.norm(dim=-1).clamp(min=1e-12))
        pred.append(((x @ s) * x).sum(-1) + _channel_constant(model, L, k))
        with torch.inference_mode():
            actual.append(post @ mlp.W_out.detach().float().cpu()[:, k] + float(mlp.b_out[k]))
    d = int(model.cfg.d_model)
    gen = torch.Generator().manual_seed(seed)
    pool = [c for c in torch.randperm(d, generator=gen).tolist() if c not in channels][:n_random]
    rand = [_spectrum(model, L, c) for c in pool]
    rf = torch.tensor([r[2] for r in rand])
    return QuadraticForm(
        layer=L,
        channels=channels,
        lambda_star=torch.tensor(lams),
        trigger=torch.stack(trig),
        frobenius=torch.tensor(frob),
        eigenvalues=torch.stack(spectra),
        all_frobenius=all_frobenius(model, L),
        random_channels=tuple(pool),
        random_frobenius=rf,
        random_lambda_share=torch.tensor([abs(r[0]) for r in rand]) / rf.clamp(min=1e-30),
        alignment=torch.stack(align),
        predicted=torch.stack(pred),
        actual=torch.stack(actual),
        is_spike=spike_mask(cap, site),
    )
