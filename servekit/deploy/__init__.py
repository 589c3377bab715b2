"""Deployment beyond one host: the container image, Kubernetes and KServe manifests (``servekit bundle``).

Torch-free like ``servekit.ops``: the bundle is generated from ``models.yaml``, the archives' own
settings and ``model_store/manifest.json``, never by importing the build side.
"""
