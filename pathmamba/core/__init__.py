"""Core plumbing every layer uses: the results layout, settings, errors, atomic files, locks, devices,
seeds, environment records, downloads. Imports no other layer of the package; only ``devices``, ``seeds``,
``environment`` and ``torch_files`` import torch."""
