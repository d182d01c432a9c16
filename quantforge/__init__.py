"""quantforge: declarative quantization builds."""

__version__ = "0.1.0"
