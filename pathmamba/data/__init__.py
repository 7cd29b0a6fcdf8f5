"""Datasets: specs of the published datasets, readers, synthetic demo data, torch datasets."""
