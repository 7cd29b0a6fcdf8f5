"""Baseline methods of the paper's Table 1, each an entry of ``pathmamba.engine.registry``."""
