"""Thin servicers: convert in, call the core, convert out, set metadata."""
