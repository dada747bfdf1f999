"""The layer- and point-wise projection mapping (LPPM) of METHODS.md section 1.

Pairing (:func:`uniform_layer_map`, :func:`pack_points`), projection into the shared space
(:class:`TeacherProjection`, :class:`StudentProjection`) and the loss there (:func:`lppm_loss`).
"""

from kdforge.alignment.layers import uniform_layer_map
from kdforge.alignment.loss import POINT_LOSSES, infonce_loss, lppm_loss, spherical_centroid
from kdforge.alignment.projection import (StudentProjection, TeacherProjection, procrustes_map, semi_orthogonal,
                                          shared_dimension)
from kdforge.alignment.resampling import pack_points, pool_points, resample_points

__all__ = [
    "POINT_LOSSES",
    "StudentProjection",
    "TeacherProjection",
    "infonce_loss",
    "lppm_loss",
    "pack_points",
    "pool_points",
    "procrustes_map",
    "resample_points",
    "semi_orthogonal",
    "shared_dimension",
    "spherical_centroid",
    "uniform_layer_map",
]
