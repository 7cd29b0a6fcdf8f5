"""Reporting: the results of an experiment read back, Table 1 and 2, statistics, figures, comparisons of runs and the
README's demo table. Reads what the engine wrote; imports the engine for its metric names, registry and
config only (``plots`` also loads a model for its heat maps), never the operations tools."""
