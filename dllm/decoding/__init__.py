"""Decoding policies and the denoising loop."""
