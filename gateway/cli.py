"""The `sluicegate` command: `serve`, `check-config`, `doctor` (can the config's stores and
providers be reached; see `gateway.doctor`); `keys` and `budgets`, which manage a
running gateway through its admin HTTP API (see `gateway.admin_client`); and `usage`, which
asks a running gateway for usage totals, or reads the usage journals on disk."""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NoReturn

import orjson

from gateway.admin_client import AdminClient, AdminError
from gateway.app import WORKERS_ENV, build_stack, check_workers
from gateway.compiled import MODULES, Build, build_of, remove, sources
from gateway.config import ConfigError, GatewayConfig, env_name_shown, load_config
from gateway.context import SELF_USAGE_PATH
from gateway.doctor import (
    DEFAULT_TIMEOUT_S,
    FAIL,
    Scrubber,
    positive_seconds,
    redact_target,
    report,
    run_doctor,
)
from gateway.kernel import check_stack, stack_components
from gateway.logs import configure_logging
from gateway.metrics import METRICS_DIR_ENV, check_otlp_metrics
from gateway.policy import OVERFLOW_ACTIONS, PERIODS, Limits, usd_to_micros
from gateway.tracing import check_tracing


def _port(text: str) -> int:
    """argparse type of `--port`: 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a port number, 0 to 65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number, 0 to 65535")
    return value


def _workers(text: str) -> int:
    """argparse type of `--workers`: 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number, 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number, 1 or more")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors never echo what was typed: a mistyped option's value may be
    a secret (`--admin-token sk-...`), and stderr lands in CI logs."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            message = "unrecognized arguments (not shown: one may be a secret)"
        elif "invalid choice:" in message:
            where, _, rest = message.partition("invalid choice:")
            choices = rest[rest.find("(choose from"):] if "(choose from" in rest else ""
            message = f"{where}invalid choice (not shown) {choices}".rstrip()
        super().error(message)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="sluicegate", description="The Sluicegate LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway under hypercorn")
    serve.add_argument("--config", required=True, help="path of the config module")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8080)
    serve.add_argument("--workers", type=_workers, default=1)
    serve.add_argument("--access-log", action="store_true", help="log every request")
    check = commands.add_parser("check-config", help="load a config module and print it")
    check.add_argument("path")
    check.add_argument("--workers", type=_workers, default=1,
                       help="check it as `serve --workers N` would run it")
    doctor = commands.add_parser(
        "doctor", help="check that the config's stores and providers answer",
        description="Starts the config's stack, checks every store its layers report, "
                    "pgvector and each provider (and deployment key) with a model-list call, "
                    "then shuts everything down. Exit 0: all ok; 1: a check failed; 2: the "
                    "config is wrong.")
    doctor.add_argument("--config", required=True, help="path of the config module")
    doctor.add_argument("--json", dest="as_json", action="store_true",
                        help="print the checks as a JSON list")
    doctor.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S,
                        metavar="S", help="bound of each check, in seconds "
                                          f"(default {DEFAULT_TIMEOUT_S:g})")
    build = commands.add_parser(
        "build", help="whether the hot path runs compiled (make compile); exit 1 when stale")
    either = build.add_mutually_exclusive_group()  # (both given: one was ignored)
    either.add_argument("--sources", action="store_true", help="print the modules' paths")
    either.add_argument("--remove", action="store_true", help="delete the compiled modules")
    _add_admin_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "build":
        return _build(args)
    if args.command == "usage" and args.own:
        return own_usage(args)
    if args.command == "usage" and args.journal is not None:
        return usage_from_journals(args)
    if args.command in ("keys", "budgets", "usage"):
        return run_admin_command(args)
    try:
        if args.command == "check-config":
            return check_config(args.path, args.workers)
        if args.command == "doctor":
            rows = run_doctor(args.config, timeout_s=args.timeout)
            print(report(rows, as_json=args.as_json))
            return 1 if any(row.status == FAIL for row in rows) else 0
        return serve_forever(args)
    except ConfigError as exc:
        print(f"sluicegate: {exc}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    if args.sources:
        print(" ".join(str(path) for path in sources()))
    elif args.remove:
        for path in remove():
            print(f"removed {path}")
    else:
        return report_build(build_of())
    return 0


def report_build(build: Build, modules: Sequence[str] = MODULES) -> int:
    """Prints `build`'s state; 1 when it is stale (its modules then run from source), so that
    `make compile` fails on a build that would not be used."""
    print(f"{build.state}{': ' + build.reason if build.reason else ''} "
          f"({len(modules)} modules: {', '.join(modules)})")
    return 1 if build.state == "stale" else 0


def check_as_the_gateway_starts(config: GatewayConfig, workers: int) -> object:
    """Builds the stack and checks what the gateway checks as it starts (the layers against
    the config, the workers, tracing and OTLP metrics), without starting anything; returns
    the stack. A ConfigError is the one sentence `serve` and `check-config` exit 2 with."""
    stack = build_stack(config)
    check_stack(stack_components(stack), config)
    check_workers(stack, workers)
    check_tracing(config.settings.tracer_provider)
    check_otlp_metrics(config.settings.metrics_path, config.settings.meter_provider)
    return stack


def check_config(path: str, workers: int = 1) -> int:
    config = load_config(path)
    stack = check_as_the_gateway_starts(config, workers)
    print(f"config: {path}")
    print("stack (outermost first):")
    print("  kernel (errors, request id, body, context, /healthz, /readyz, /v1/models)")
    for item in config.middleware:
        options = ", ".join(f"{k}=..." for k in item.kwargs)  # values may hold secrets (DSNs)
        print(f"  {getattr(item.cls, '__name__', item.cls)}({options})")
    print(f"  {type(_innermost(stack)).__name__} (innermost)")
    build = build_of()
    print(f"build: {build.state}{' (' + build.reason + ')' if build.reason else ''}")
    print("providers:")
    for name, adapter in config.providers.items():
        key = f", key from ${adapter.api_key_env}" if adapter.api_key_env else ", no key"
        print(f"  {name}: {adapter.type_name} at {redact_target(adapter.base_url)}{key}")
    print("models:")
    for name, model in config.models.items():
        print(f"  {name}:")
        for deployment in model.deployments:
            tokens = deployment.tokenizer.source if deployment.tokenizer else "estimated"
            print(f"    -> {deployment.provider} / {deployment.model} (weight "
                  f"{deployment.weight:g}; input tokens: {tokens})")
    return 0


def _innermost(app: object) -> object:
    inner: object = getattr(app, "app", None)
    while inner is not None:
        app, inner = inner, getattr(inner, "app", None)
    return app


def serve_forever(args: argparse.Namespace) -> int:
    from hypercorn.config import Config
    from hypercorn.run import run
    from hypercorn.utils import LifespanFailureError

    from gateway.supervisor import Supervisor, lifespan_failure

    path = os.path.abspath(args.config)
    # Fail fast, in the parent, with one sentence (exit 2: systemd does not restart it).
    config: GatewayConfig = load_config(path)
    stack = check_as_the_gateway_starts(config, args.workers)
    os.environ[WORKERS_ENV] = str(max(args.workers, 1))  # (a reload checks its config too)
    os.environ["SLUICEGATE_CONFIG"] = path
    # This serve's own directory: the config the running workers loaded (a reload with a
    # broken file keeps serving it, and a worker replacing a dead one loads it; see
    # gateway/asgi.py: written by the supervisor once a generation of workers all started)
    # and, with several workers, their metrics.
    run_dir = tempfile.mkdtemp(prefix="sluicegate-serve-")
    atexit.register(shutil.rmtree, run_dir, True)
    os.environ["SLUICEGATE_CONFIG_LAST_GOOD"] = os.path.join(run_dir, "last-good-config.py")
    if args.workers > 1:
        os.environ.setdefault(METRICS_DIR_ENV, os.path.join(run_dir, "metrics"))
        os.makedirs(os.environ[METRICS_DIR_ENV], exist_ok=True)
    scrub = Scrubber.for_config(config, stack_components(stack))
    configure_logging(config.settings.log_level, config.settings.log_format,
                      redact=scrub.redact)
    hyper = Config()
    hyper.bind = [f"{args.host}:{args.port}"]
    hyper.worker_class = "uvloop"
    hyper.application_path = "gateway.asgi:app"
    # One worker runs in this process (no spawn); N > 1 spawns N processes sharing the socket.
    hyper.workers = 0 if args.workers <= 1 else args.workers
    hyper.keep_alive_timeout = 75
    hyper.include_server_header = False  # do not advertise the server software (OWASP)
    hyper.graceful_timeout = 30
    # Hypercorn's own logs go through the root handler (JSON lines, with everything else).
    hyper.errorlog = logging.getLogger("hypercorn.error")
    if args.access_log:
        hyper.accesslog = logging.getLogger("hypercorn.access")
    if hyper.workers == 0 and hasattr(signal, "SIGHUP"):
        # One in-process worker cannot be swapped: a reload (SIGHUP) needs --workers 2 or
        # more, or a rolling restart. Say so instead of dying on the signal.
        signal.signal(signal.SIGHUP, lambda *_: logging.getLogger("sluicegate").warning(
            "SIGHUP ignored: reloading the config needs --workers 2 or more"))
    if hyper.workers > 1:  # reloads start the new workers before the old ones drain
        supervisor = Supervisor(hyper, hyper.workers, ready_dir=os.path.join(run_dir, "ready"),
                                last_good=os.environ["SLUICEGATE_CONFIG_LAST_GOOD"])
        status, failure = supervisor.run(), supervisor.startup_failure
    else:
        try:
            status, failure = run(hyper), None
        except LifespanFailureError as exc:
            status, failure = 1, lifespan_failure(exc)
    if failure is not None:
        # A store unreachable at startup, say: one sentence, as doctor says it (the worker
        # logged the traceback), and 1, not 2: starting again later may succeed.
        print(f"sluicegate: {scrub(failure)}", file=sys.stderr)
    return status


# -- keys and budgets: a running gateway's admin API -------------------------------------------

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_TOKEN_ENV = "SLUICEGATE_ADMIN_TOKEN"
NEW_KEY_NOTE = ("Store the key now: this is the only time it is shown (the gateway keeps only "
                "its hash).")
VIRTUAL_KEY_PREFIX = "sk-sg-"  # middleware.auth.keys.KEY_PREFIX (the gateway package may not
                               # import a layer)

Handler = Callable[[AdminClient, argparse.Namespace], int]


class UsageError(Exception):
    """A command line the CLI cannot act on: one sentence, exit status 2."""


class _RefuseTokenOption(argparse.Action):
    # A token in argv lands in shell history and `ps`; say so without echoing it.
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.error("the admin token is never taken on the command line; put it in an "
                     f"environment variable and name that with --token-env "
                     f"(default {DEFAULT_TOKEN_ENV})")


def _add_admin_commands(commands: Any) -> None:
    keys = _admin_parser(commands, "keys", "manage virtual keys on a running gateway",
                         group=True)
    actions = keys.add_subparsers(dest="action", required=True)
    create = _admin_parser(actions, "create", "create a key (its plaintext is printed once)")
    create.add_argument("--project", required=True)
    create.add_argument("--model", dest="models", action="append", metavar="GLOB",
                        help="a model the key may use (repeatable; default: every model)")
    create.add_argument("--expires", type=_timestamp, metavar="ISO",
                        help="expiry, e.g. 2030-01-01T00:00:00Z")
    create.add_argument("--require-customer", action="store_true",
                        help="refuse requests that do not name the end customer")
    create.add_argument("--meta", action="append", type=_meta_item, metavar="KEY=VALUE")
    _add_limit_options(create, budget_flag="--budget-usd")
    create.set_defaults(handler=_keys_create, on_overflow=None, downgrade_to=None,
                        stream_cutoff=None)
    listing = _admin_parser(actions, "list", "list keys (never their plaintext or hash)")
    listing.add_argument("--project")
    listing.add_argument("--status", choices=("active", "revoked", "disabled", "expired"))
    listing.set_defaults(handler=_keys_list)
    for name, handler, text in (
            ("revoke", _keys_revoke, "revoke a key at once, on every gateway"),
            ("rotate", _keys_rotate, "replace a key (same settings; the old one is revoked)")):
        action = _admin_parser(actions, name, text)
        action.add_argument("key_id", metavar="ID")
        action.set_defaults(handler=handler)

    budgets = _admin_parser(commands, "budgets", "rate limits and budgets of a key, project "
                                                 "or customer", group=True)
    actions = budgets.add_subparsers(dest="action", required=True)
    put = _admin_parser(actions, "set", "change the limits (unnamed ones are kept)")
    _add_subject_options(put)
    _add_limit_options(put, budget_flag="--usd")
    put.add_argument("--on-overflow", choices=OVERFLOW_ACTIONS,
                     help="for the rate limits and every budget of the subject")
    put.add_argument("--downgrade-to", metavar="MODEL", help="with --on-overflow downgrade")
    put.add_argument("--stream-cutoff", action=argparse.BooleanOptionalAction,
                     help="end streams that cross a budget (every budget of the subject)")
    put.add_argument("--clear", action="store_true",
                     help="drop the stored limits first (alone: remove them)")
    put.set_defaults(handler=_budgets_set)
    show = _admin_parser(actions, "show", "print the limits and the current spend")
    _add_subject_options(show)
    show.set_defaults(handler=_budgets_show)

    usage = _admin_parser(commands, "usage", "usage totals from a running gateway, or with "
                                             "--journal from the usage journals on disk",
                          group=True)
    usage.add_argument("--group-by", choices=USAGE_GROUPS,
                       help="total per project (default), key, customer or model")
    usage.add_argument("--since", type=_usage_time, metavar="ISO",
                       help="from, e.g. 2025-01-01 or 2025-01-01T12:00:00Z (UTC unless an "
                            "offset is given; default: 30 days before --until; with "
                            "--journal, no limit)")
    usage.add_argument("--until", type=_usage_time, metavar="ISO",
                       help="up to, excluded (default: now)")
    usage.add_argument("--grain", choices=("day", "minute"),
                       help="the gateway's rollups to sum: whole days (default) or minutes; "
                            "--since and --until widen to whole ones, as the report's "
                            "header shows")
    usage.add_argument("--journal", metavar="DIR",
                       help="read the journals under DIR instead of asking a gateway (read-only, "
                            "safe while a gateway runs): every request when the gateway has no "
                            "PostgreSQL, else those not written to it yet")
    usage.add_argument("--self", dest="own", action="store_true",
                       help="a virtual key's own totals (GET /v1/usage/self), the key read "
                            "from the variable --key-env names; no admin token needed")
    usage.add_argument("--key-env", default=DEFAULT_KEY_ENV, metavar="NAME",
                       help=f"with --self: the environment variable holding the virtual key "
                            f"(default {DEFAULT_KEY_ENV})")
    usage.set_defaults(handler=_usage)


def _admin_parser(parent: Any, name: str, text: str, *,
                  group: bool = False) -> argparse.ArgumentParser:
    """A parser taking the connection options, both before and after the action's name."""
    parser: argparse.ArgumentParser = parent.add_parser(name, help=text, description=text,
                                                        allow_abbrev=False)

    def default(value: object) -> object:
        # An action's parser leaves unset options out, or they would override the group's.
        return value if group else argparse.SUPPRESS

    parser.add_argument("--url", default=default(None),
                        help=f"the gateway (default: $SLUICEGATE_URL or {DEFAULT_URL})")
    parser.add_argument("--token-env", "--admin-token-env", dest="token_env",
                        default=default(DEFAULT_TOKEN_ENV), metavar="NAME",
                        help="the environment variable holding the admin token "
                             f"(default {DEFAULT_TOKEN_ENV})")
    parser.add_argument("--json", dest="as_json", action="store_true",
                        default=default(False), help="print the API's JSON")
    parser.add_argument("--token", "--admin-token", nargs="?", action=_RefuseTokenOption,
                        help=argparse.SUPPRESS)
    return parser


def _add_subject_options(parser: argparse.ArgumentParser) -> None:
    subject = parser.add_mutually_exclusive_group(required=True)
    subject.add_argument("--key", metavar="ID", help="a key's id (key_...)")
    subject.add_argument("--project", metavar="P")
    subject.add_argument("--customer", metavar="P/C", help="a project's end customer")


def _add_limit_options(parser: argparse.ArgumentParser, *, budget_flag: str) -> None:
    parser.add_argument(budget_flag, dest="usd", type=_usd, metavar="D",
                        help="a budget in US dollars")
    parser.add_argument("--period", choices=PERIODS,
                        help=f"of the budget (default monthly; with {budget_flag})")
    parser.add_argument("--rpm", type=_count, metavar="N", help="requests per minute")
    parser.add_argument("--tpm", type=_count, metavar="N", help="tokens per minute")
    parser.add_argument("--max-concurrent", type=_count, metavar="N",
                        help="requests in flight")


def run_admin_command(args: argparse.Namespace) -> int:
    """Runs `keys ...`, `budgets ...` or `usage`: 0 done, 1 the API refused, 2 a usage error."""
    handler: Handler = args.handler
    return _exit_code(lambda: handler(_admin_client(args), args))


def _exit_code(run: Callable[[], int]) -> int:
    """`run()`'s exit code, or the one sentence of a usage error (2) or a refusal (1)."""
    try:
        return run()
    except UsageError as exc:
        print(f"sluicegate: {exc}", file=sys.stderr)
        return 2
    except AdminError as exc:
        print(f"sluicegate: {exc}", file=sys.stderr)
        return 1


def _admin_client(args: argparse.Namespace) -> AdminClient:
    name: str = args.token_env
    token = os.environ.get(name, "").strip()
    if not token:
        # If a token was given where the variable's name belongs, do not print it.
        shown = (f"${name}" if env_name_shown(name)
                 else "the variable named by --token-env")
        raise UsageError(f"The admin token is read from {shown}, which is empty or not set; "
                         "export it or name another variable with --token-env.")
    if token.startswith(VIRTUAL_KEY_PREFIX):  # the admin API would refuse it: not sent at all
        raise UsageError(f"${name} holds a virtual key ({VIRTUAL_KEY_PREFIX}...), not the admin "
                         "token." if env_name_shown(name) else
                         "The variable named by --token-env holds a virtual key, not the "
                         "admin token.")
    url = args.url or os.environ.get("SLUICEGATE_URL") or DEFAULT_URL
    try:
        return AdminClient(url, token)
    except ValueError as exc:  # the message never holds the token
        raise UsageError(f"{str(exc)[:1].upper()}{str(exc)[1:]}.") from None


# -- keys --------------------------------------------------------------------------------------

def _keys_create(client: AdminClient, args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {}
    if args.models:
        settings["allowed_models"] = args.models
    if args.expires is not None:
        settings["expires_at"] = args.expires
    if args.require_customer:
        settings["require_customer"] = True
    if args.meta:
        settings["metadata"] = dict(args.meta)
    if _limit_flags_given(args):
        settings["limits"] = _changed_limits({}, args)
    _print_new_key(client.create_key(args.project, **settings), args.as_json)
    return 0


def _keys_list(client: AdminClient, args: argparse.Namespace) -> int:
    keys = [{k: v for k, v in key.items() if k not in ("key", "key_hash")}
            for key in client.list_keys(args.project, status=args.status)]
    if args.as_json:
        _print_json({"object": "list", "data": keys})
    elif not keys:
        print("No keys." if args.project is None else f"No keys in project {args.project}.")
    else:
        rows = [["ID", "HINT", "PROJECT", "STATUS", "MODELS", "EXPIRES"]]
        rows += [[_text(key.get("id")), _text(key.get("hint")), _text(key.get("project")),
                  _text(key.get("status")), _text(",".join(key.get("allowed_models") or ()) or "*"),
                  _text(key.get("expires_at") or "never")] for key in keys]
        print(_table(rows))
    return 0


def _keys_revoke(client: AdminClient, args: argparse.Namespace) -> int:
    key = client.revoke_key(args.key_id)
    if args.as_json:
        _print_json(key)
    else:
        print(f"Revoked key {_text(key.get('id'))} of project {_text(key.get('project'))}.")
    return 0


def _keys_rotate(client: AdminClient, args: argparse.Namespace) -> int:
    rotated = client.rotate_key(args.key_id)
    _print_new_key(rotated, args.as_json)
    if not args.as_json:
        print(f"The old key {_text(rotated.get('rotated_from'))} is revoked.", file=sys.stderr)
    return 0


def _print_new_key(payload: dict[str, Any], as_json: bool) -> None:
    plaintext = payload.get("key")
    if not isinstance(plaintext, str):
        raise AdminError(200, "The gateway's answer holds no key.")
    if as_json:
        _print_json(payload)
    else:
        print(f"id:  {_text(payload.get('id'))}\nkey: {plaintext}")
    print(NEW_KEY_NOTE, file=sys.stderr)


# -- budgets -----------------------------------------------------------------------------------

def _budgets_set(client: AdminClient, args: argparse.Namespace) -> int:
    kind, subject = _subject(args)
    changes = (_limit_flags_given(args) or args.on_overflow is not None
               or args.stream_cutoff is not None)
    if not changes and not args.clear:
        raise UsageError("Nothing to set: give --usd, --rpm, --tpm, --max-concurrent, "
                         "--on-overflow, --stream-cutoff or --clear.")
    if not changes:
        return _clear_limits(client, kind, subject, args.as_json)
    current = {} if args.clear else _stored_limits(client, kind, subject) or {}
    stored = client.put_limits(kind, subject, _changed_limits(current, args))
    if args.as_json:
        _print_json(stored)
    else:
        print(f"Limits of {kind} {subject} are now:")
        print("\n".join(_describe_limits(stored.get("limits") or {})))
    return 0


def _clear_limits(client: AdminClient, kind: str, subject: str, as_json: bool) -> int:
    try:
        payload = client.delete_limits(kind, subject)
    except AdminError as exc:
        if exc.code != "limits_not_found":
            raise
        payload = {"object": "limits", "kind": kind, "subject_id": subject, "deleted": False}
    if as_json:
        _print_json(payload)
    elif payload.get("deleted"):
        print(f"Removed the limits of {kind} {subject}.")
    else:
        print(f"No limits were stored for {kind} {subject}.")
    return 0


def _budgets_show(client: AdminClient, args: argparse.Namespace) -> int:
    kind, subject = _subject(args)
    limits = _stored_limits(client, kind, subject)
    usage: dict[str, Any] | None = None
    unavailable = None
    # A key's spend is kept under its account (the first key of its rotation line).
    account = client.get_key(subject).get("account") if kind == "key" else None
    try:
        usage = client.usage(kind, account if isinstance(account, str) else subject)
    except AdminError as exc:
        if exc.status != 404:
            raise
        unavailable = ("this gateway does not serve /admin/usage (its QuotaMiddleware has no "
                       "admin_token_env)")
    if args.as_json:
        _print_json({"kind": kind, "subject_id": subject, "limits": limits, "usage": usage,
                     "usage_unavailable": unavailable})
        return 0
    if limits is None:
        print(f"No limits are stored for {kind} {subject}.")
    else:
        print(f"Limits of {kind} {subject}:")
        print("\n".join(_describe_limits(limits)))
    if unavailable is not None:
        print(f"Current spend: not available; {unavailable}.")
    else:
        print("Current spend (committed: spent plus reserved by requests in flight):")
        print("\n".join(_describe_usage(usage or {}, (limits or {}).get("budgets") or [])))
    return 0


def _subject(args: argparse.Namespace) -> tuple[str, str]:
    if args.key is not None:
        return "key", args.key
    if args.project is not None:
        return "project", args.project
    project, _, customer = args.customer.partition("/")
    if not project or not customer:
        raise UsageError("--customer takes PROJECT/CUSTOMER, e.g. acme/alice.")
    return "customer", args.customer


def _stored_limits(client: AdminClient, kind: str, subject: str) -> dict[str, Any] | None:
    """The subject's limits (`Limits.to_json` shape), None when none are stored. Stored
    limits the gateway cannot read (written by an older version) are an error: neither
    shown as none nor merged into as if empty."""
    try:
        payload = client.get_limits(kind, subject)
    except AdminError as exc:
        if exc.code == "limits_not_found":
            return None
        raise
    if payload.get("limits_error"):
        raise UsageError(f"The limits stored for {kind} {subject} cannot be read "
                         f"({payload['limits_error']}); set them anew with "
                         "`sluicegate budgets set ... --clear` and the limits to keep.")
    limits = payload.get("limits")
    return limits if isinstance(limits, dict) else None


def _limit_flags_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None
               for name in ("usd", "period", "rpm", "tpm", "max_concurrent"))


def _changed_limits(current: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`current` with the command line's changes; a same-period budget is replaced, keeping
    its other settings. Checked here, so a mistake is a usage error rather than an HTTP 400."""
    if args.period is not None and args.usd is None:
        raise UsageError("--period goes with a budget amount (--usd or --budget-usd).")
    if (args.on_overflow == "downgrade") != (args.downgrade_to is not None):
        raise UsageError("--on-overflow downgrade and --downgrade-to MODEL go together.")
    limits = {**current}
    for name in ("rpm", "tpm", "max_concurrent"):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    budgets = [dict(budget) for budget in limits.get("budgets") or ()]
    if args.usd is not None:
        period = args.period or "monthly"
        same = [budget for budget in budgets if budget.get("period") == period]
        budgets = [budget for budget in budgets if budget.get("period") != period]
        budgets.append({**(same[0] if same else {}), "limit_usd": str(args.usd),
                        "period": period})
    if args.on_overflow is not None:
        for target in (limits, *budgets):
            target["on_overflow"], target["downgrade_to"] = args.on_overflow, args.downgrade_to
    if args.stream_cutoff is not None:
        if not budgets:
            raise UsageError("--stream-cutoff applies to budgets, and this subject has none; "
                             "give --usd too.")
        for budget in budgets:
            budget["stream_cutoff"] = args.stream_cutoff
    limits["budgets"] = budgets
    try:
        return Limits.from_json(limits).to_json()
    except (ValueError, TypeError) as exc:
        raise UsageError(f"Those limits are not valid: {exc}.") from None


def _describe_limits(limits: dict[str, Any]) -> list[str]:
    lines = [f"  {label}: {_text(limits[name]) if limits.get(name) is not None else 'no limit'}"
             for label, name in (("rpm", "rpm"), ("tpm", "tpm"),
                                 ("max concurrent", "max_concurrent"))]
    lines.append(f"  on overflow: {_overflow(limits)}")
    for budget in limits.get("budgets") or ():
        cutoff = ", streams cut off" if budget.get("stream_cutoff") else ""
        lines.append(f"  budget: ${_text(budget.get('limit_usd'))} "
                     f"{_text(budget.get('period'))}, {_overflow(budget)} on overflow{cutoff}")
    if not limits.get("budgets"):
        lines.append("  budget: none")
    return lines


def _describe_usage(usage: dict[str, Any], budgets: list[dict[str, Any]]) -> list[str]:
    periods: dict[str, Any] = usage.get("periods") or {}
    limits = {budget.get("period"): budget.get("limit_usd") for budget in budgets}
    lines = []
    for period in PERIODS:
        spent = (periods.get(period) or {}).get("committed_usd")
        since = _text((periods.get(period) or {}).get("period_start") or "?")
        if period not in limits and spent is None:
            continue
        line = f"  {period}: ${_text(spent if spent is not None else '0')}"
        if period in limits:
            line += f" of ${_text(limits[period])}{_percent(spent, limits[period])}"
        line += " in all" if period == "lifetime" else f" since {since}"
        lines.append(line + (" (nothing counted yet)" if spent is None else ""))
    return lines or ["  nothing counted yet"]


def _overflow(limits: dict[str, Any]) -> str:
    if limits.get("on_overflow") == "downgrade":
        return f"downgrade to {_text(limits.get('downgrade_to'))}"
    return _text(limits.get("on_overflow") or "block")


def _percent(spent: Any, limit: Any) -> str:
    try:
        ratio = Decimal(spent or 0) / Decimal(limit) * 100
    except (ArithmeticError, TypeError, ValueError):
        return ""
    return f" ({ratio.quantize(Decimal('0.1'))}%)"


# -- usage -------------------------------------------------------------------------------------

USAGE_GROUPS = ("project", "key", "customer", "model")


DEFAULT_KEY_ENV = "SLUICEGATE_API_KEY"


class _KeyClient(AdminClient):
    """The admin API's client, holding a virtual key instead of the admin token: with it the
    gateway answers only the key's own usage."""

    def own_usage(self, *, since: str | None, until: str | None,
                  grain: str | None) -> dict[str, Any]:
        query = {"since": since, "until": until, "grain": grain}
        return self._call("GET", SELF_USAGE_PATH,
                          query={name: value for name, value in query.items()
                                 if value is not None})


def _usage(client: AdminClient, args: argparse.Namespace) -> int:
    group_by = args.group_by or "project"
    report = client.usage_totals(group_by, since=_iso(args.since), until=_iso(args.until),
                                 grain=args.grain)
    if args.as_json:
        _print_json(report)
        return 0
    _print_usage(group_by, report, _rows(report))
    return 0


def own_usage(args: argparse.Namespace) -> int:
    """Runs `usage --self`: 0 done, 1 the gateway refused, 2 a usage error. The table is
    `usage --group-by key`'s, of one key."""
    return _exit_code(lambda: _own_usage(args))


def _own_usage(args: argparse.Namespace) -> int:
    if args.journal is not None or args.group_by not in (None, "key"):
        raise UsageError("--self asks a gateway for one key's totals: it takes no "
                         "--journal or --group-by.")
    report = _key_client(args).own_usage(since=_iso(args.since), until=_iso(args.until),
                                         grain=args.grain)
    if args.as_json:
        _print_json(report)
        return 0
    rows = [{**row, "subject": report.get("key_id")} for row in _rows(report)]
    _print_usage("key", report, rows)
    return 0


def _key_client(args: argparse.Namespace) -> _KeyClient:
    name: str = args.key_env
    shown = f"${name}" if env_name_shown(name) else "the variable named by --key-env"
    key = os.environ.get(name, "").strip()
    if not key:
        raise UsageError(f"The virtual key is read from {shown}, which is empty or not set; "
                         "export it or name another variable with --key-env.")
    if not key.isascii() or not key.isprintable() or " " in key:
        raise UsageError(f"The virtual key in {shown} must be printable ASCII without "
                         "spaces.")
    url = args.url or os.environ.get("SLUICEGATE_URL") or DEFAULT_URL
    try:
        return _KeyClient(url, key)
    except ValueError as exc:  # (the URL: the key was checked above)
        raise UsageError(f"{str(exc)[:1].upper()}{str(exc)[1:]}.") from None


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = report.get("data")
    if not isinstance(rows, list):
        raise AdminError(200, "The gateway answered the usage request without a 'data' list.")
    return rows


def _print_usage(group_by: str, report: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(f"Usage by {group_by} from {_text(report.get('since'))} to "
          f"{_text(report.get('until'))} ({_text(report.get('grain'))} rollups):")
    print(_usage_table(group_by, rows))


def usage_from_journals(args: argparse.Namespace) -> int:
    """Runs `usage --journal DIR`: 0 done, 1 the journals cannot be read, 2 a usage error."""
    if args.url is not None or args.grain is not None:
        print("sluicegate: --journal reads the journals on disk, so it takes no --url or "
              "--grain.", file=sys.stderr)
        return 2
    group_by = args.group_by or "project"
    # gateway/ never imports a layer (DESIGN.md), but the journal's format is the metering
    # layer's own: this offline command loads the layer's reader by name when it runs, as a
    # config module names its layers.
    metering = importlib.import_module("middleware.metering")
    try:
        rows: list[dict[str, Any]] = metering.journal_usage(
            args.journal, group_by=group_by, since=args.since, until=args.until)
    except (metering.JournalError, OSError) as exc:
        print(f"sluicegate: {_sentence(str(exc))}", file=sys.stderr)
        return 1
    if args.as_json:
        _print_json({"object": "usage", "source": "journal", "journal": args.journal,
                     "group_by": group_by, "since": _iso(args.since),
                     "until": _iso(args.until), "data": rows})
        return 0
    print(f"Usage by {group_by} in the journals under {_text(args.journal)} (requests "
          "not written to PostgreSQL; with no PostgreSQL, every request):")
    print(_usage_table(group_by, rows))
    return 0


def _usage_table(group_by: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No usage recorded."
    table = [[group_by.upper(), "REQUESTS", "INPUT TOKENS", "OUTPUT TOKENS", "COST USD",
              "SAVED USD"]]
    table += [[_text(row.get(name)) for name in ("subject", "requests", "input_tokens",
                                                  "output_tokens", "cost_usd", "cost_saved_usd")]
              for row in rows]
    return _table(table, right_aligned=range(1, 6))


# -- argument types and output -----------------------------------------------------------------

def _count(text: str) -> int:
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError("must be a whole number >= 0")
    return int(text)


def _usd(text: str) -> Decimal:
    try:
        value = Decimal(text)
        usd_to_micros(value)  # finer than a micro-dollar raises ValueError
    except (ArithmeticError, ValueError):
        raise argparse.ArgumentTypeError("must be an amount in US dollars, e.g. 25 or "
                                         "12.50") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _timestamp(text: str) -> str:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an ISO 8601 date and time, e.g. "
                                         "2030-01-01T00:00:00Z") from None
    if value.utcoffset() is None:
        raise argparse.ArgumentTypeError("needs a timezone, e.g. 2030-01-01T00:00:00Z")
    return value.isoformat()


def _usage_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an ISO 8601 date or time, e.g. 2025-01-31 or "
                                         "2025-01-31T12:00:00Z") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _meta_item(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("must be KEY=VALUE")
    return name, value


def _text(value: object) -> str:
    """A value from the API, safe for a terminal: no control characters or escapes."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def _table(rows: list[list[str]], *, right_aligned: Collection[int] = ()) -> str:
    """Columns padded to their widest cell; numbers go in the `right_aligned` columns."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    lines = ("  ".join(cell.rjust(width) if index in right_aligned else cell.ljust(width)
                       for index, (cell, width) in enumerate(zip(row, widths, strict=True)))
             for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def _sentence(text: str) -> str:
    text = _text(text).rstrip(".")
    return f"{text[:1].upper()}{text[1:]}."


def _print_json(payload: Any) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    sys.exit(main())
