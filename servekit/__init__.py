"""Build-side code: the model spec, training and quantization, and archive building."""

__version__ = "0.1.0"
