"""Adapters between tinyserve and model frameworks."""
