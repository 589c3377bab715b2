"""Observing what serves: the metrics sources (the ``/metrics`` page, Prometheus), drift against the
archive's reference, and ``servekit top``.

Reads what ``servekit.serving`` publishes; never imports ``servekit.deploy`` and never torch.
"""
