"""Schedulers that group requests into executor runs."""
