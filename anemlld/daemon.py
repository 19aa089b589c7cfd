"""The daemon: wires settings, the model registry, conversion jobs, the drop
folder watcher, residency, the service layer and its two transports (the
ZeroMQ server and the HTTP APIs) together, and owns logging and signals. Data flows one way: folder -> job -> converted model -> resident
model -> stream of tokens."""
from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import threading
import time
from pathlib import Path

from anemlld import __version__
from anemlld.jobs import Jobs
from anemlld.registry import Registry
from anemlld.residency import Residency
from anemlld.server import Server
from anemlld.service import Service
from anemlld.watcher import DropWatcher
from shared.settings import Settings

log = logging.getLogger(__name__)


def setup_logging(settings: Settings, foreground: bool = True) -> None:
    """A rotating log file in the logs folder, plus stderr in the foreground."""
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(getattr(logging, settings.log_level.upper(), logging.INFO))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [
        logging.handlers.RotatingFileHandler(settings.log_path, maxBytes=5 * 1024 * 1024, backupCount=3)]
    if foreground:
        handlers.append(logging.StreamHandler())
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    # coremltools and transformers are chatty at INFO.
    for noisy in ("coremltools", "transformers", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry()
        self.jobs = Jobs(settings, self.registry)
        self.residency = Residency(settings, self.registry)
        self.service = Service(settings, self.registry, self.residency, self.jobs)
        self.server = Server(self.service)
        self.http = None
        if settings.http is not None:
            from anemlld.http.server import HttpServer  # starlette and uvicorn only when HTTP is on

            self.http = HttpServer(self.service, settings.http)
        self.watcher = DropWatcher(settings, self.jobs.submit)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`); then shut down in a
        few seconds: the current generation is cancelled, a conversion's child
        process is ended (its finished parts stay) and the conversion resumes
        at the next start."""
        t = time.perf_counter()
        self.server.bind()  # first: a second daemon on the same home fails fast
        if self.http is not None:
            self.service.http_url = self.http.bind()
        self.jobs.start()
        self.watcher.start()
        self.residency.preload_pinned()
        if self.http is not None:
            self.http.start()
        log.info("anemlld %s serving %s (drop folder %s) after %.0f ms", __version__, self.settings.endpoint,
                 self.settings.drop_dir, (time.perf_counter() - t) * 1000)
        try:
            self.server.serve_forever()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.server.stop()

    def shutdown(self) -> None:
        log.info("shutting down")
        if self.http is not None:
            self.http.stop()
        self.watcher.stop()
        if not self.jobs.stop(timeout=5.0):
            log.warning("the conversion in progress did not reach a stage boundary; it resumes at next start")
        self.residency.stop()
        self.jobs.close()
        log.info("stopped")


def run(home: str | None = None, foreground: bool = True) -> int:
    settings = Settings.load(home=home)
    settings.make_dirs()
    setup_logging(settings, foreground)
    daemon = Daemon(settings)

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        daemon.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    log.info("pid %d, home %s", os.getpid(), settings.home or Path("~").expanduser())
    daemon.run()
    return 0
