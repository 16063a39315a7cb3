"""pidrt: a deployment runtime for personalized-identity Stable Diffusion 1.5 UNets."""

__version__ = "0.1.0"
