"""microdit: MicroDiT text-to-image diffusion training on a micro-budget, end to end."""

__version__ = "0.1.0"
