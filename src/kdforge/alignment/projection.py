"""The projections into the shared aligned space (METHODS.md section 1, "Shared aligned space").

Every teacher layer ``m, l`` reaches the space through a fixed semi-orthogonal map ``Q_{m,l}`` (an
isometry: it cannot collapse the target, and teachers of different widths land in one space); every
student layer through a learned projection ``P_l``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError


def shared_dimension(widths: list[int], multiple: int = 64) -> int:
    """The default dimension ``D`` of the shared space: the largest width rounded up to ``multiple``."""
    if not widths or min(widths) < 1 or multiple < 1:
        raise KdforgeError(f"shared dimension needs positive widths and multiple, got {widths} and {multiple}")
    return -(-max(widths) // multiple) * multiple


def semi_orthogonal(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """A fixed ``(out_dim, in_dim)`` float32 matrix ``Q`` with ``Q^T Q = I``, so ``||Q x|| = ||x||``.

    ``Q`` is the reduced QR factor of a standard Gaussian drawn from ``seed``. QR fixes each column
    only up to sign; multiplying by ``sign(diag(R))`` removes that freedom, which makes ``Q`` a
    function of the seed alone and Haar-distributed (Mezzadri 2007).

    Args:
        in_dim: width of the vectors mapped (``d_m``).
        out_dim: width of the shared space (``D``), at least ``in_dim``.
        seed: seed of the Gaussian draw.

    Returns:
        ``(out_dim, in_dim)`` float32, orthonormal columns.
    """
    if out_dim < in_dim:
        raise KdforgeError(f"a semi-orthogonal map needs out_dim >= in_dim, got {in_dim} -> {out_dim}")
    # Drawn and factorised in float64 so the float32 result is orthonormal to float32 precision.
    gaussian = torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).to(torch.float32)


def procrustes_map(cross_covariance: Tensor) -> Tensor:
    """The semi-orthogonal ``Q`` that best carries points ``x_i`` onto targets ``y_i`` (orthogonal
    Procrustes, Schonemann 1966).

    ``argmin_{Q^T Q = I} sum_i ||Q x_i - y_i||^2`` is ``U V^T`` for the thin SVD ``U S V^T`` of
    ``C = sum_i y_i x_i^T``: the squared error is a constant minus ``2 tr(Q^T C)``.

    Args:
        cross_covariance: ``(..., D, d)``, ``C`` (a batch of them for several layers), ``D >= d``.

    Returns:
        ``(..., D, d)`` float32 with orthonormal columns.
    """
    if cross_covariance.shape[-2] < cross_covariance.shape[-1]:
        raise KdforgeError(f"a semi-orthogonal map needs D >= d, got a {tuple(cross_covariance.shape[-2:])} "
                           "cross-covariance")
    u, _, vh = torch.linalg.svd(cross_covariance.double(), full_matrices=False)
    return (u @ vh).float()


def layer_seed(seed: int, layer_slot: int) -> int:
    """The seed of one layer's map: distinct slots and distinct teacher seeds give unrelated maps.

    ``seed + slot`` would give teacher 0's second layer the same map as teacher 1's first.
    """
    return int(np.random.SeedSequence([seed, layer_slot]).generate_state(1, dtype=np.uint64)[0])


def check_layer_slot(layer_slot: int, num_layers: int) -> None:
    """Reject a slot outside ``[0, num_layers)``: a negative one would silently pick a layer from the end."""
    if not 0 <= layer_slot < num_layers:
        raise IndexError(f"layer slot {layer_slot} is outside [0, {num_layers - 1}]")


class TeacherProjection(nn.Module):
    """One teacher's maps ``R^{width} -> R^{dim}``, one per mapped layer.

    ``kind``:
        - ``"fixed"`` (default): the semi-orthogonal ``Q_{m,l}``, held as buffers so no optimiser
          sees them and checkpoints keep them exactly.
        - ``"learned"``: trainable ``nn.Linear(width, dim, bias=False)`` started at the same
          ``Q_{m,l}``; an ablation that must be paired with an anti-collapse term
          (:func:`~kdforge.alignment.infonce_loss`).
        - ``"identity"``: no map, for ``width == dim`` (the TextBrewer-style MSE baseline).
    """

    def __init__(self, width: int, dim: int, num_layers: int, seed: int,
                 kind: Literal["fixed", "learned", "identity"] = "fixed"):
        super().__init__()
        if kind not in ("fixed", "learned", "identity"):
            raise KdforgeError(f"teacher projection kind must be fixed, learned or identity, got {kind!r}")
        if kind == "identity" and width != dim:
            raise KdforgeError(f"an identity teacher projection needs width == dim, got {width} and {dim}")
        self.kind = kind
        self.num_layers = num_layers
        if kind == "identity":
            return
        maps = [semi_orthogonal(width, dim, layer_seed(seed, slot)) for slot in range(num_layers)]
        if kind == "fixed":
            self.register_buffer("maps", torch.stack(maps))
        else:
            self.layers = nn.ModuleList(nn.Linear(width, dim, bias=False) for _ in maps)
            with torch.no_grad():
                for layer, start in zip(self.layers, maps):
                    layer.weight.copy_(start)

    def forward(self, hidden: Tensor, layer_slot: int) -> Tensor:
        """``(B, T, width) -> (B, T, dim)`` through the map of mapped layer ``layer_slot``."""
        check_layer_slot(layer_slot, self.num_layers)
        if self.kind == "identity":
            return hidden
        if self.kind == "learned":
            return self.layers[layer_slot](hidden)
        # The map is cast, not the states: cached teacher states stay at the cache's precision.
        return nn.functional.linear(hidden, self.maps[layer_slot].to(hidden.dtype))

    def map_layers(self, hidden: Tensor) -> Tensor:
        """``(layers, N, width) -> (layers, N, dim)``: each mapped layer's points through its own map.

        Fixed maps take one batched product instead of a product per layer and a stack of the results.
        """
        if hidden.dim() != 3 or hidden.shape[0] != self.num_layers:
            raise ValueError(f"expected ({self.num_layers}, N, width) points, got {tuple(hidden.shape)}")
        if self.kind == "fixed":
            return torch.bmm(hidden, self.maps.transpose(1, 2).to(hidden.dtype))
        return torch.stack([self(points, slot) for slot, points in enumerate(hidden)])


class StudentProjection(nn.Module):
    """The ``P_l: R^{width} -> R^{dim}``, one per mapped student layer, learned by default.

    ``kind``: ``"linear"`` is an affine ``width -> dim`` map (:class:`BatchedLinear`); ``"mlp"`` is
    ``Linear(width, dim) -> GELU -> Linear(dim, dim)`` (:class:`LayerMLPs`); ``"fixed"`` (an ablation) is a seeded
    semi-orthogonal map like a teacher's (:class:`TeacherProjection` from ``seed``), which nothing
    trains: a learned projection can absorb the mapping without the student's states moving
    (docs/results-asr.md), a fixed one leaves the states as the only thing the loss can change.
    """

    def __init__(self, width: int, dim: int, num_layers: int, kind: Literal["linear", "mlp", "fixed"] = "linear",
                 seed: int = 0):
        super().__init__()
        if kind == "fixed":
            self.layers = TeacherProjection(width, dim, num_layers, seed)
        elif kind == "linear":
            self.layers = BatchedLinear(width, dim, num_layers)
        elif kind == "mlp":
            self.layers = LayerMLPs(width, dim, num_layers)
        else:
            raise KdforgeError(f"student projection kind must be linear, mlp or fixed, got {kind!r}")

    def forward(self, hidden: Tensor, layer_slot: int) -> Tensor:
        """``(B, T, width) -> (B, T, dim)`` through the projection of mapped layer ``layer_slot``."""
        return self.layers(hidden, layer_slot)

    def map_layers(self, hidden: Tensor) -> Tensor:
        """``(layers, N, width) -> (layers, N, dim)``: each mapped layer's points through its own projection.

        Fixed and linear projections take one batched product (forward and backward are one product
        each instead of one per layer).
        """
        return self.layers.map_layers(hidden)


class LayerMLPs(nn.ModuleList):
    """``num_layers`` small MLPs ``Linear(width, dim) -> GELU -> Linear(dim, dim)``, one per mapped layer."""

    def __init__(self, width: int, dim: int, num_layers: int):
        super().__init__(nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim)) for _ in range(num_layers))

    def forward(self, hidden: Tensor, layer_slot: int) -> Tensor:
        """``(..., width) -> (..., dim)`` through the MLP of layer ``layer_slot``."""
        check_layer_slot(layer_slot, len(self))
        return self[layer_slot](hidden)

    def map_layers(self, hidden: Tensor) -> Tensor:
        """``(num_layers, N, width) -> (num_layers, N, dim)``, each layer's points through its own MLP."""
        if hidden.dim() != 3 or hidden.shape[0] != len(self):
            raise ValueError(f"expected ({len(self)}, N, width) points, got {tuple(hidden.shape)}")
        return torch.stack([mlp(points) for mlp, points in zip(self, hidden)])


class BatchedLinear(nn.Module):
    """``num_layers`` affine maps ``R^{width} -> R^{dim}`` held as one ``(num_layers, width, dim)`` weight
    and one ``(num_layers, dim)`` bias, each layer's drawn as ``nn.Linear(width, dim)`` draws its own.

    Held stacked, every layer's points go through their maps in one ``baddbmm`` whose weight gradient
    lands in the parameter as it is: per-layer ``nn.Linear`` modules cost a stack of their weights per
    step and a transposing copy of each gradient (the projections' forward and backward went from 18.5
    to 17.7 ms without them, ``mapping_products_seconds`` of ``kdforge bench perf``, docs/performance.md).
    """

    def __init__(self, width: int, dim: int, num_layers: int):
        super().__init__()
        drawn = [nn.Linear(width, dim) for _ in range(num_layers)]  # same draws, in the same order
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().T for layer in drawn]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in drawn]))

    def forward(self, hidden: Tensor, layer_slot: int) -> Tensor:
        """``(..., width) -> (..., dim)`` through the map of layer ``layer_slot``."""
        check_layer_slot(layer_slot, len(self.weight))
        return hidden @ self.weight[layer_slot] + self.bias[layer_slot]

    def map_layers(self, hidden: Tensor) -> Tensor:
        """``(num_layers, N, width) -> (num_layers, N, dim)``, each layer's points through its own map."""
        if hidden.dim() != 3 or hidden.shape[0] != len(self.weight):
            raise ValueError(f"expected ({len(self.weight)}, N, width) points, got {tuple(hidden.shape)}")
        return torch.baddbmm(self.bias.unsqueeze(1), hidden, self.weight)
