"""End-to-end pipelines built on carv-pyro."""
