"""Backbone adapters: where each model family keeps its text-conditioned attention modules (`unet`: SD 1.x / 2.x / XL)."""
