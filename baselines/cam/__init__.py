"""The CAM family: a shared multi-label classifier and a toolbox turning class maps into masks."""
