"""Raptor's version, recorded in every embedding, probe and batch record."""

__version__ = "0.1.0"
