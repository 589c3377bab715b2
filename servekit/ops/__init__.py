"""Operator side: the TorchServe launcher, guards, store checks, deployment workflows, proxy and CLI.

Nothing here imports torch: an operator command must answer at once.
"""
