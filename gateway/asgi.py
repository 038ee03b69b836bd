"""`gateway.asgi:app` — the app hypercorn workers import, built from $SLUICEGATE_CONFIG.

A reload (SIGHUP to `sluicegate serve --workers N`: new workers start and import this module
again, then the old ones drain, see gateway/supervisor.py) reads the config file anew.
When the new file is broken (or names a layer that cannot run in several workers:
`gateway.app.check_workers`), the workers keep serving the last config that loaded
(`$SLUICEGATE_CONFIG_LAST_GOOD`, a copy `serve` keeps) and log why, so a bad edit never
takes the gateway down.
"""
from __future__ import annotations

import logging
import os
import shutil

from gateway.app import WORKERS_ENV, check_workers, create_app, tune_gc
from gateway.config import ConfigError
from gateway.h11_body import install as install_h11_body_shortcut
from gateway.h11_cycle import install as install_h11_cycle_shortcut
from gateway.h11_headers import install as install_h11_header_memo
from gateway.h11_headers import install_hypercorn as install_hypercorn_header_memo
from gateway.hypercorn_h11 import install as install_hypercorn_plain_requests
from gateway.hypercorn_idle import install as install_idle_timer
from gateway.hypercorn_writes import install as install_gathering_writer
from gateway.kernel import Kernel
from gateway.logs import configure_logging
from gateway.supervisor import announce_ready

logger = logging.getLogger("sluicegate")


def _load() -> Kernel:
    path = os.environ["SLUICEGATE_CONFIG"]
    last_good = os.environ.get("SLUICEGATE_CONFIG_LAST_GOOD")
    try:
        kernel = create_app(path)
        check_workers(kernel, int(os.environ.get(WORKERS_ENV, "1")))
    except ConfigError as exc:
        if not last_good or not os.path.isfile(last_good):
            raise
        logger.error("the config did not load (%s); serving the last config that did", exc)
        return create_app(last_good)
    if last_good:
        temporary = last_good + f".{os.getpid()}.tmp"
        shutil.copyfile(path, temporary)
        os.replace(temporary, last_good)  # the other workers see the old or the new copy
    return kernel


# A spawned worker starts with no logging set up: the serve process's handler, first with
# the defaults (so loading the config logs as JSON too), then as the config says.
configure_logging("info", "json")
app = _load()
app.after_startup.append(announce_ready)  # a reload waits for this before old workers stop
configure_logging(app.config.settings.log_level, app.config.settings.log_format)
tune_gc()
install_h11_header_memo()  # this process is a server of ours: see gateway/h11_headers.py
install_hypercorn_header_memo()
install_h11_body_shortcut()  # body chunks straight to the writer: see gateway/h11_body.py
install_h11_cycle_shortcut()  # a plain request/response cycle: see gateway/h11_cycle.py
install_hypercorn_plain_requests()  # no upgrade checks for those: gateway/hypercorn_h11.py
install_idle_timer()  # one timer per idle connection: see gateway/hypercorn_idle.py
install_gathering_writer()  # one send(2) per turn: see gateway/hypercorn_writes.py
