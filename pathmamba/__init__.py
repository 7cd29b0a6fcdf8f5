"""PathMamba benchmark: weakly supervised multi-class segmentation of pathology images."""

__version__ = "0.1.0"
