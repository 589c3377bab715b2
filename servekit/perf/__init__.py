"""Measurement: the benchmark (``make bench``) and the soak (``make soak``)."""
