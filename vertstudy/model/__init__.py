"""Model stage: residual blocks, integral regression and the multi-label classification and
localization network of Qin et al. (paper section II)."""

from vertstudy.model.integral import argmax_coordinates, integral_regression
from vertstudy.model.network import VertebraNet, build_model, estimate_activation_bytes

__all__ = [
    "VertebraNet",
    "argmax_coordinates",
    "build_model",
    "estimate_activation_bytes",
    "integral_regression",
]
