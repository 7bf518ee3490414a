"""Child-process entry: ``python -m options.simulator --config-json '{...}' --port 0``."""

from __future__ import annotations

import argparse

from options.simulator.config import SimulatorConfig
from options.simulator.server import announce, serve_forever


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m options.simulator", description=main.__doc__)
    parser.add_argument("--config-json", default="{}", help="SimulatorConfig.to_json() output")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    args = parser.parse_args(argv)
    config = SimulatorConfig.from_json(args.config_json)
    serve_forever(config, host=args.host, port=args.port, on_ready=announce)


if __name__ == "__main__":
    main()
