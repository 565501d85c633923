"""Backends that run batches: one module per backend behind the interface in ``base``."""
