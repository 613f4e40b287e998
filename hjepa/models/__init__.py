"""Encoder (vit), predictor, and the H-JEPA module (levels, pooling, loss, EMA)."""
