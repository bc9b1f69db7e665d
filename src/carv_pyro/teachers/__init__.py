"""Frozen diffusion teachers."""
