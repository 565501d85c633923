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
    p.add_argument(
        "--workers",
        type=_workers,
        help="transport processes serving the gRPC port in front of one engine, or auto "
        "(SLUICE_WORKERS; default auto: 1 on one core, else one per usable core, at most 4)",
    )
    tls = p.add_argument_group("TLS (plaintext without a certificate)")
    tls.add_argument(
        "--tls-cert-file", type=Path, help="PEM certificate chain (SLUICE_TLS__CERT_FILE)"
    )
    tls.add_argument("--tls-key-file", type=Path, help="its PEM key (SLUICE_TLS__KEY_FILE)")
    tls.add_argument(
        "--tls-client-ca-file",
        type=Path,
        help="CAs of accepted client certificates (SLUICE_TLS__CLIENT_CA_FILE)",
    )
    tls.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        default=None,
        help="mTLS: refuse clients without a certificate (SLUICE_TLS__REQUIRE_CLIENT_CERT)",
    )


def _tls_flags(args: argparse.Namespace) -> dict[str, object] | None:
    given = {
        "cert_file": args.tls_cert_file,
        "key_file": args.tls_key_file,
        "client_ca_file": args.tls_client_ca_file,
        "require_client_cert": args.tls_require_client_cert,
    }
    return {key: value for key, value in given.items() if value is not None} or None


def _workers(value: str) -> int | str:
    """``--workers``: a number, or ``auto`` (the machine's choice, over the settings file)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or auto, not {value!r}") from None


def _run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from sluice.app import run

    config = args.config or (
        Path(os.environ["SLUICE_CONFIG"]) if os.environ.get("SLUICE_CONFIG") else None
    )
    try:
        settings = load_settings(
            config,
            host=args.host,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            model_repository=args.model_repository,
            workers=args.workers,
            tls=_tls_flags(args),
        )
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            print(f"sluice serve: invalid settings: {where}: {error['msg']}", file=sys.stderr)
        return 1
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
