"""Serving: the processes we run beside TorchServe and what runs inside them.

The launcher (``server``), the management guard and the worker guard, the OIP gateway and its
``/metrics`` page (``oip``, ``oip_service``, ``exporter``), nginx and the Prometheus launcher
(``nginx``, ``monitor``), the proxy's log keeper, pid checks (``processes``), the model store's
names and manifest (``store``), and the one TorchServe client (``client``). The lowest operator
room: it imports neither ``servekit.observe`` nor ``servekit.deploy``, and nothing here imports
torch (an operator command must answer at once).
"""
