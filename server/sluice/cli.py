"""The ``sluice`` command: ``serve`` runs the server; the rest are client commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sluice.settings import load_settings


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve a model repository")
    p.add_argument("--host", help="bind address (SLUICE_HOST, default 127.0.0.1)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (SLUICE_GRPC_PORT, default 8001)")
    p.add_argument(
        "--metrics-port", type=int, help="Prometheus port (SLUICE_METRICS_PORT, default 8002)"
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        help="model repository (SLUICE_MODEL_REPOSITORY, default: the examples)",
    )
    p.add_argument("--config", type=Path, help="YAML settings file (SLUICE_CONFIG)")


def _run_serve(args: argparse.Namespace) -> int:
    from sluice.app import run

    config = args.config or (
        Path(os.environ["SLUICE_CONFIG"]) if os.environ.get("SLUICE_CONFIG") else None
    )
    settings = load_settings(
        config,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_repository=args.model_repository,
    )
    from sluice import logs

    logs.configure(settings.log_level, settings.log_format)
    return run(settings)


def _capabilities_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("capabilities", help="what this machine offers the backends (JSON)")
    p.set_defaults(run=_run_capabilities)


def _run_capabilities(args: argparse.Namespace) -> int:
    import json

    from sluice.executors.capabilities import detect

    print(json.dumps(detect().to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _capabilities_parser(sub)
    from sluice_client.cli import add_client_commands

    add_client_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _run_serve(args)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
