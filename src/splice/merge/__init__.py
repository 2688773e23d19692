"""Merging adapters into base weights and exporting standalone models."""
