"""`python -m tests.mock_providers`: serve the mock providers in the foreground.

Used by `make run` (the offline demo) and `make mock`. Stops on SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from tests.mock_providers.faults import PROVIDERS, MockConfig
from tests.mock_providers.server import PREFIXES, MockProviderServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.mock_providers",
                                     description="Mock LLM provider APIs on a loopback port.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--ttft-s", type=float, default=0.0, help="delay before the first byte")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0,
                        help="delay between streamed content chunks")
    parser.add_argument("--chunk-chars", type=int, default=8, help="characters per chunk")
    parser.add_argument("--expect-key", action="append", default=[], metavar="PROVIDER=KEY",
                        help="accept only KEY for PROVIDER (repeatable)")
    parser.add_argument("--no-record", action="store_true",
                        help="keep no request log (for long load runs)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> MockConfig:
    keys: dict[str, str] = {}
    for item in args.expect_key:
        provider, sep, key = item.partition("=")
        if not sep or provider not in PROVIDERS or not key:
            raise ValueError(f"--expect-key wants PROVIDER=KEY with PROVIDER one of "
                             f"{', '.join(PROVIDERS)}, not {item!r}")
        keys[provider] = key
    if args.chunk_chars < 1:
        raise ValueError("--chunk-chars must be at least 1")
    return MockConfig(ttft_s=args.ttft_s, chunk_delay_s=args.chunk_delay_s,
                      chunk_chars=args.chunk_chars, expected_keys=keys or None,
                      record_requests=not args.no_record)


async def serve(server: MockProviderServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start_async()
    bases = ", ".join(f"{name} {server.url}{prefix}" for name, prefix in PREFIXES.items())
    print(f"mock providers listening: {bases}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop_async()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        server = MockProviderServer(config_from(args), host=args.host, port=args.port)
    except ValueError as exc:
        print(f"mock providers: {exc}.", file=sys.stderr)
        return 2
    try:
        import uvloop
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(server))
    except OSError as exc:
        print(f"mock providers: cannot listen on {args.host}:{args.port} ({exc.strerror}).",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
