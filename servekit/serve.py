"""``make serve``: build what is missing, start TorchServe as soon as the first model is built, register the
rest as each is built.

On a fresh clone every model trains before it can be archived (the detector about a minute on two cores).
Nothing waits for what it does not need: the versions that ``config.properties`` loads at start are built
first (those whose trained weights are cached before those that must train), TorchServe starts in the
background with the first of them, each further one is registered through the management API the moment
its archive is written (the same registration the start would have made: the archive's own workers and
batch settings), and the remaining versions are built last. A model answers from the moment its line
``serve: <model> <version> answers`` is printed; the command returns when every model in
``load_models`` answers and every version in the spec is built, and prints how to call them.

A restart with a saved snapshot of registered versions (``make stop`` then ``make serve``) restores that
snapshot: then every archive is built first and TorchServe starts with all of them, as before. A build
error stops the server this command started and exits 1 with the one-line error.

    python -m servekit.serve [--fresh] [--spec models.yaml] [--workdir var] [--model-store model_store]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings
from pathlib import Path

from servekit.deploy.workflows import serving_settings
from servekit.errors import ServekitError
from servekit.serving.oip_service import default_router
from servekit.serving.server import REPO_ROOT, ServerError, TorchServeProcess, announce, load_models_archives


def _say(started: float, text: str) -> None:
    print(f"serve: {text} ({time.monotonic() - started:.0f}s)", flush=True)


class _Background:
    """``server.start()`` in a thread, so the next model trains while TorchServe and its workers come up."""

    def __init__(self, server: TorchServeProcess, on_ready) -> None:
        self.server = server
        self.on_ready = on_ready
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="torchserve-start", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.start()
            self.on_ready()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by wait()
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _order(specs: list, at_start: set[str], cache_dir: Path) -> list:
    """The versions loaded at start first (cached weights before training), then the rest in spec order."""
    from servekit.build.training import cached_weights_path

    def needs_training(spec) -> bool:
        if spec.program is not None or spec.weights.file or spec.weights.torchvision:
            return False
        return not cached_weights_path(spec, cache_dir).is_file()

    first = [s for s in specs if s.archive_name in at_start]
    rest = [s for s in specs if s.archive_name not in at_start]
    return sorted(first, key=needs_training) + rest


def serve(server: TorchServeProcess, spec_path: Path, cache_dir: Path) -> None:
    from servekit.build.archive import build_version, is_current  # torch: only now
    from servekit.build.spec import load_spec

    started = time.monotonic()
    specs = load_spec(spec_path)
    snapshot = server.latest_snapshot() if server.restore else None
    if snapshot is not None:
        _say(started, f"restoring the registered versions from {snapshot.name}: every version is built first")
        for spec in specs:
            build_version(spec, server.model_store, cache_dir)
        server.start()
        return
    if server.props.get("load_models", "").strip().lower() == "all":
        at_start = {s.archive_name for s in specs}
    else:
        at_start = set(load_models_archives(server.props.get("load_models"), server.model_store))
    order = _order(specs, at_start, cache_dir)
    waiting = [s for s in order if s.archive_name in at_start]
    if not waiting:
        raise ServerError(f"config.properties' load_models names no version of {spec_path.name}: nothing to serve")
    names = ", ".join(f"{s.name} {s.version}" for s in waiting)
    _say(started, f"{len(specs)} versions in {spec_path.name}; {names} each answer as soon as built")
    ready: list = []  # built, for the start
    background: _Background | None = None
    try:
        for spec in order:
            if background is None and ready and (spec not in waiting or not is_current(spec, server.model_store)):
                background = _start(server, ready, started)
            build_version(spec, server.model_store, cache_dir)
            if spec not in waiting:
                continue
            if background is None:
                ready.append(spec)
                continue
            background.wait()
            path = server.model_store / spec.archive_name
            params = {"url": spec.archive_name, "synchronous": "true", **serving_settings(path)}
            server.client().manage("POST", "/models", params=params)
            _say(started, f"{spec.name} {spec.version} answers")
        if background is None:
            background = _start(server, ready, started)
        background.wait()
    except BaseException:
        if background is not None:
            background.thread.join()
            server.stop()
        raise
    _say(started, "every version is built; every model in load_models answers")


def _start(server: TorchServeProcess, ready: list, started: float) -> _Background:
    server.props["load_models"] = ",".join(s.archive_name for s in ready)
    names = ", ".join(f"{s.name} {s.version}" for s in ready)
    _say(started, f"starting TorchServe with {names} (the rest build meanwhile)")
    return _Background(server, lambda: _say(started, f"TorchServe is Healthy: {names} answer"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(REPO_ROOT / "models.yaml"))
    parser.add_argument("--workdir", default=str(REPO_ROOT / "var"))
    parser.add_argument("--model-store", default=str(REPO_ROOT / "model_store"))
    parser.add_argument("--cache", default=str(REPO_ROOT / "build" / "cache"), help="trained-weights cache")
    parser.add_argument(
        "--fresh", action="store_true", help="start from config.properties, ignoring the saved snapshot of versions"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notices, once per export
    server = TorchServeProcess(
        Path(args.workdir),
        Path(args.model_store),
        snapshots=True,
        restore=not args.fresh,
        router=default_router(Path(args.workdir)),
    )  # OIP inference through `servekit proxy` when it runs
    try:
        if (pid := server.running_pid()) is not None:
            raise ServerError(f"TorchServe is already running (pid {pid}); make stop first")
        server.check_ports()  # before minutes of building, not after
        serve(server, Path(args.spec), Path(args.cache))
    except ServekitError as exc:
        print(f"serve: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    announce(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
