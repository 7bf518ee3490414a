"""Child-process entry: ``python -m options.simulator --config-json '{...}' --port 0``."""

from __future__ import annotations

import argparse
import sys

from options.simulator.config import SimulatorConfig
from options.simulator.server import announce, describe, serve_forever


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve until SIGINT or SIGTERM.

    Once listening it prints ``listening on URL`` on stdout (what :class:`SimulatorProcess`
    waits for) and, unless ``--quiet``, the key and tickers it serves on stderr.
    """
    parser = argparse.ArgumentParser(prog="python -m options.simulator", description=main.__doc__)
    parser.add_argument("--config-json", default="{}", help="SimulatorConfig.to_json() output")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument(
        "--quiet", action="store_true", help="no description of what is served on stderr"
    )
    args = parser.parse_args(argv)
    config = SimulatorConfig.from_json(args.config_json)

    def ready(base_url: str) -> None:
        if not args.quiet:
            print(describe(config, base_url), file=sys.stderr, flush=True)
        announce(base_url)

    serve_forever(config, host=args.host, port=args.port, on_ready=ready)


if __name__ == "__main__":
    main()
