"""Deployment: changing what serves, and shipping it.

The workflows over TorchServe's management API (``workflows``), the one deployment state, its lock
and history (``state``, ``state_lock``, ``history``), the canary/shadow proxy (``proxy``), the
progressive rollout (``rollout``), and the container image with its Kubernetes and KServe manifests
(``bundle``). Uses ``servekit.serving`` and ``servekit.observe``; torch-free: the bundle is generated
from ``models.yaml``, the archives' own settings and ``model_store/manifest.json``, never by
importing the build side.
"""
