"""Build side: the spec, data sets, training, conversion (INT8, BF16) and archive packaging. Imports torch."""
