"""Adapters that meet users in the tools they already run (a file per tool)."""
