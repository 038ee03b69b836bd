"""`gateway.asgi:app` — the app hypercorn workers import, built from $SLUICEGATE_CONFIG.

A reload (SIGHUP to `sluicegate serve --workers N`: new workers start and import this module
again, then the old ones drain, see gateway/supervisor.py) reads the config file anew.
When the new file is broken (or names a layer that cannot run in several workers:
`gateway.app.check_workers`), the workers keep serving the last good config
(`$SLUICEGATE_CONFIG_LAST_GOOD`: a copy of the text the running workers loaded) and log
why, so a bad edit never takes the gateway down. A worker that replaces one that died loads
that copy too. Only the supervisor writes it, from the text a worker hands over once its
startup completed, when it accepts that worker's whole generation (gateway/supervisor.py):
a reload rejected because one of its workers failed to start never becomes the last good.
The first start has no copy yet: its broken config is an error (`serve` checks it before any
worker starts).
"""
from __future__ import annotations

import logging
import os
from functools import partial

from gateway.app import WORKERS_ENV, check_workers, create_app, tune_gc
from gateway.config import ConfigError
from gateway.doctor import Scrubber
from gateway.h11_body import install as install_h11_body_shortcut
from gateway.h11_cycle import install as install_h11_cycle_shortcut
from gateway.h11_headers import install as install_h11_header_memo
from gateway.h11_headers import install_hypercorn as install_hypercorn_header_memo
from gateway.hypercorn_h11 import install as install_hypercorn_plain_requests
from gateway.hypercorn_h11 import install_error_bodies as install_hypercorn_error_bodies
from gateway.hypercorn_idle import install as install_idle_timer
from gateway.hypercorn_writes import install as install_gathering_writer
from gateway.kernel import Kernel, stack_components
from gateway.logs import configure_logging
from gateway.supervisor import REPLACEMENT_ENV, announce_ready

logger = logging.getLogger("sluicegate")


def _load() -> tuple[Kernel, bytes | None]:
    """The app, and the text of the config file it loaded, for the supervisor to keep as
    the last good once it accepts this worker (None: it loaded the last good copy)."""
    path = os.environ["SLUICEGATE_CONFIG"]
    last_good = os.environ.get("SLUICEGATE_CONFIG_LAST_GOOD")
    if os.environ.get(REPLACEMENT_ENV) == "1" and last_good and os.path.isfile(last_good):
        # A worker replacing one that died: the running workers' config, whatever the file
        # says now (an edit not yet reloaded is the next reload's). It failing is a failure.
        return create_app(last_good), None
    try:
        with open(path, "rb") as file:
            text = file.read()
        kernel = create_app(path)
        check_workers(kernel, int(os.environ.get(WORKERS_ENV, "1")))
    except (ConfigError, OSError) as exc:
        if not last_good or not os.path.isfile(last_good):
            raise
        why = str(exc)
    else:
        return kernel, text
    # (out of the except: the last good failing too chains no unredacted `why` to its error)
    kernel = create_app(last_good)
    # Nothing redacts this process's logs yet (set up once a config loaded): `why` goes out
    # without the last good config's secrets, URL userinfo, virtual keys or password=...
    # (a config module's own exception may quote any of them).
    scrub = Scrubber.for_config(kernel.config, stack_components(kernel.app))
    logger.error("the config did not load (%s); serving the last config that did",
                 scrub.redact(why))
    return kernel, None


# A spawned worker starts with no logging set up: the serve process's handler, first with
# the defaults (so loading the config logs as JSON too), then as the config says.
configure_logging("info", "json")
app, _loaded_text = _load()
# A reload waits for this before old workers stop (and the config becomes the last good).
app.after_startup.append(partial(announce_ready, _loaded_text))
# Libraries log what they like (psycopg a DSN's password): the config's secrets go out.
configure_logging(app.config.settings.log_level, app.config.settings.log_format,
                  redact=Scrubber.for_config(app.config, stack_components(app.app)).redact)
tune_gc()
install_h11_header_memo()  # this process is a server of ours: see gateway/h11_headers.py
install_hypercorn_header_memo()
install_h11_body_shortcut()  # body chunks straight to the writer: see gateway/h11_body.py
install_h11_cycle_shortcut()  # a plain request/response cycle: see gateway/h11_cycle.py
install_hypercorn_plain_requests()  # no upgrade checks for those: gateway/hypercorn_h11.py
install_hypercorn_error_bodies()  # a request h11 cannot read: a JSON 400 that says so
install_idle_timer()  # one timer per idle connection: see gateway/hypercorn_idle.py
install_gathering_writer()  # one send(2) per turn: see gateway/hypercorn_writes.py
