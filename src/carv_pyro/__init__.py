"""carv-pyro: cheaper gradients from frozen diffusion teachers, as a Pyro plugin."""

__version__ = "0.1.0"
