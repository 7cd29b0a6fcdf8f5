"""The engine every method shares: the method registry and the workflow config checked against it, training,
evaluation and its metrics, pseudo masks, prediction, model files and exports. Imports ``core``, ``data``,
``models`` and (through the registry's targets) ``baselines``; never reporting or operations."""
