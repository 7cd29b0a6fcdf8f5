"""Models: backbones, the selective scan, the Contrastive Mamba Block, MIML and PathMamba."""
