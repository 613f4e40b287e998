"""Datasets, transforms, mixtures and the verification CLI; one module per concept."""
