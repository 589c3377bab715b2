"""Code that runs inside TorchServe workers: a shared base and one handler class per task."""
