"""`gateway.asgi:app` — the app hypercorn workers import, built from $SLUICEGATE_CONFIG."""
from __future__ import annotations

import os

from gateway.app import create_app, tune_gc

app = create_app(os.environ["SLUICEGATE_CONFIG"])
tune_gc()
