"""Fully connected CRF (Kraehenbuehl and Koltun, NIPS 2011) with ``pydensecrf2``, as HistoSegNet uses it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf

# Probabilities are clipped away from 0 before the log, so a zero map gives a large finite unary.
_MIN_PROBABILITY = 1e-5


@dataclass(frozen=True)
class CRFSettings:
    """Pairwise kernels and mean-field iterations; defaults are HistoSegNet's (Chan et al., ICCV 2019):
    a Gaussian (smoothness) kernel and a bilateral (appearance) kernel with Potts compatibilities."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 30.0
    bilateral_sxy: float = 10.0
    bilateral_srgb: float = 20.0
    bilateral_compat: float = 50.0
    iterations: int = 5


def build_crf(image: np.ndarray, probabilities: np.ndarray, settings: CRFSettings) -> dcrf.DenseCRF2D:
    """The dense CRF of one image: unary -log(p), the two Potts kernels of ``settings``.

    image (H, W, 3) uint8 RGB, probabilities (L, H, W) float, one map per label (need not sum to 1:
    the unary is -log of each map, as pydensecrf's ``unary_from_softmax`` without normalisation).
    """
    labels, height, width = probabilities.shape
    if image.shape != (height, width, 3) or image.dtype != np.uint8:
        raise ValueError(f"crf: image must be ({height}, {width}, 3) uint8 to match the probabilities, "
                         f"got {image.shape} {image.dtype}")
    crf = dcrf.DenseCRF2D(width, height, labels)
    unary = -np.log(np.clip(probabilities, _MIN_PROBABILITY, None)).reshape(labels, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=settings.bilateral_compat)
    return crf


def dense_crf(image: np.ndarray, probabilities: np.ndarray, settings: CRFSettings = CRFSettings()) -> np.ndarray:
    """Mean-field marginals (L, H, W) float32 after ``settings.iterations`` updates; see ``build_crf``."""
    labels, height, width = probabilities.shape
    crf = build_crf(image, probabilities, settings)
    return np.asarray(crf.inference(settings.iterations), dtype=np.float32).reshape(labels, height, width)
