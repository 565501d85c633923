"""Client subcommands of the ``sluice`` command: ``health``, ``models``, ``infer``,
``generate`` and ``count-tokens``.

``sluice_client.cli.main`` runs them on their own (the ``sluice-client`` command of the
standalone distribution). Every command takes the connection options (``--url``, default
``$SLUICE_URL`` or 127.0.0.1:8001; ``--timeout-s``; TLS: ``--tls``, ``--ca-file``,
``--cert-file``, ``--key-file``, ``--server-name``, each also read from the environment);
a failed call prints one line to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from sluice_client._channel import DEFAULT_TARGET, TLSConfig
from sluice_client.client import Client
from sluice_client.errors import NotFound, SluiceClientError
from sluice_client.names import model_health_service
from sluice_client.results import GenerateChunk, InferResult, RepositoryModel

#: Sluice reports each model's health under this prefix + the model name.

_PRINT_OPTIONS: dict[str, Any] = {"threshold": 24, "edgeitems": 3, "max_line_width": 100}

Action = Callable[[Client, argparse.Namespace], int]


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``health``, ``models`` and ``infer``; each sets ``run`` (args -> exit status)."""
    common = connection_arguments()

    health = sub.add_parser("health", parents=[common], help="grpc.health.v1 status")
    health.add_argument("--model", help="a model's health instead of the server's")
    health.set_defaults(run=_with_client(_health))

    models = sub.add_parser(
        "models",
        parents=[common],
        help="list the model repository, or change what a model serves",
        description="sluice models [list] | history NAME | load NAME [VERSION] | "
        "unload NAME [VERSION] | promote NAME VERSION | rollback NAME",
    )
    models.add_argument("action", nargs="?", default="list", choices=sorted(_MODEL_ACTIONS))
    models.add_argument("name", nargs="?", help="the model")
    models.add_argument("version", nargs="?", default="", help="the version")
    models.add_argument("--reason", default="", help="recorded in the model's history")
    models.add_argument("--admin-token", help="admin credential for changes (SLUICE_ADMIN_TOKEN)")
    models.set_defaults(run=_with_client(_models))

    infer = sub.add_parser("infer", parents=[common], help="run one inference")
    infer.add_argument("model")
    infer.add_argument(
        "--input",
        dest="inputs",
        action="append",
        type=_named_file,
        required=True,
        metavar="NAME=FILE.npy",
        help="an input tensor (repeat)",
    )
    infer.add_argument("--output-dir", type=Path, help="save each output as NAME.npy here")
    infer.add_argument("--version", default="", help="model version (default: the server's)")
    infer.set_defaults(run=_with_client(_infer))
    _add_generation_commands(sub, common)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice-client", description=__doc__)
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


def connection_arguments() -> argparse.ArgumentParser:
    """The options every client command takes (a parent parser): where the server is, the
    deadline, and TLS. ``connect`` turns them into a client."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"server HOST:PORT (SLUICE_URL, default {DEFAULT_TARGET})")
    common.add_argument("--timeout-s", type=float, default=30.0, help="call deadline in seconds")
    tls = common.add_argument_group("TLS (any of these turns it on)")
    tls.add_argument(
        "--tls", action="store_true", help="TLS, verifying the server with the system's CAs"
    )
    for flag, (variable, meaning) in _TLS_OPTIONS.items():
        tls.add_argument(f"--{flag}", help=f"{meaning} ({variable})")
    return common


#: TLS flags, the environment variables they fall back to, and what they give.
_TLS_OPTIONS = {
    "ca-file": ("SLUICE_CA_FILE", "PEM CAs that signed the server's certificate"),
    "cert-file": ("SLUICE_CERT_FILE", "PEM client certificate, for mTLS"),
    "key-file": ("SLUICE_KEY_FILE", "its PEM private key"),
    "server-name": ("SLUICE_SERVER_NAME", "name to verify the server's certificate against"),
}


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    given = {
        flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) or os.environ.get(variable)
        for flag, (variable, _) in _TLS_OPTIONS.items()
    }
    if not (args.tls or any(given.values())):
        return None
    return TLSConfig(**{key: value or None for key, value in given.items()})


def connect(args: argparse.Namespace) -> Client:
    """A client for the connection options of ``connection_arguments``."""
    url = args.url or os.environ.get("SLUICE_URL") or DEFAULT_TARGET
    admin_token = getattr(args, "admin_token", None) or os.environ.get("SLUICE_ADMIN_TOKEN")
    return Client(url, timeout_s=args.timeout_s, admin_token=admin_token, tls=_tls(args))


def _with_client(action: Action) -> Callable[[argparse.Namespace], int]:
    """Run ``action`` with a client; failures become one line on stderr and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            with connect(args) as client:
                return action(client, args)
        except (SluiceClientError, OSError, ValueError) as exc:
            print(f"sluice {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def _named_file(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, Path(path)


def _health(client: Client, args: argparse.Namespace) -> int:
    service = model_health_service(args.model) if args.model else ""
    try:
        status = client.health(service)
    except NotFound:
        print(f"sluice health: NOT_FOUND: no health status for {service!r}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.action == "list":
        print(_table(client.models()))
        return 0
    if not args.name or (args.action == "promote" and not args.version):
        print(f"sluice models {args.action}: name the model (and the version)", file=sys.stderr)
        return 2
    print(_MODEL_ACTIONS[args.action](client, args))
    return 0


def _history(client: Client, args: argparse.Namespace) -> str:
    rows = [("TIME", "ACTION", "FROM", "TO", "WHO", "REASON")]
    rows += [
        (e.time, e.action, e.from_version or "-", e.to_version or "-", e.who, e.reason)
        for e in client.history(args.name)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(f"{cell:<{w}}" for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
        for row in rows
    ).rstrip()


def _unload(client: Client, args: argparse.Namespace) -> str:
    client.unload_model(args.name, version=args.version, reason=args.reason)
    return f"unloaded {args.name}" + (f" version {args.version}" if args.version else "")


_MODEL_ACTIONS: dict[str, Callable[[Client, argparse.Namespace], str]] = {
    "list": lambda client, args: "",
    "history": _history,
    "load": lambda c, a: (
        "loaded versions: " + ", ".join(c.load_model(a.name, version=a.version, reason=a.reason))
    ),
    "unload": _unload,
    "promote": lambda c, a: "serving: {} -> {}".format(
        *c.promote(a.name, a.version, reason=a.reason)
    ),
    "rollback": lambda c, a: "serving: {} -> {}".format(*c.rollback(a.name, reason=a.reason)),
}


def _table(rows: list[RepositoryModel]) -> str:
    cells = [("NAME", "VERSION", "STATE", "REASON")]
    cells += [(r.name, r.version or "-", r.state, r.reason) for r in rows]
    name_w, version_w, state_w = (max(len(row[i]) for row in cells) for i in range(3))
    return "\n".join(
        f"{name:<{name_w}}  {version:<{version_w}}  {state:<{state_w}}  {reason}".rstrip()
        for name, version, state, reason in cells
    )


def _infer(client: Client, args: argparse.Namespace) -> int:
    inputs = {name: np.load(path, allow_pickle=False) for name, path in args.inputs}
    result = client.infer(args.model, inputs, version=args.version)
    print(f"model {result.model} version {result.version}")
    for name, array in result.outputs.items():
        print(f"{name}  {result.datatypes[name]}  {list(array.shape)}")
        print(np.array2string(array, **_PRINT_OPTIONS))
    if args.output_dir is not None:
        _save_outputs(result, args.output_dir)
    return 0


def _save_outputs(result: InferResult, directory: Path) -> None:
    """One ``NAME.npy`` per output; BYTES outputs are saved as fixed-width bytes ("S"),
    so they load without pickle (numpy drops trailing NUL bytes of such elements)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in result.outputs.items():
        if Path(name).name != name:
            raise ValueError(f"output name {name!r} is not a plain file name; not saving it")
        saved: npt.NDArray[Any] = array.astype(np.bytes_) if array.dtype == object else array
        np.save(directory / f"{name}.npy", saved, allow_pickle=False)
        print(f"saved {directory / f'{name}.npy'}")


def _add_generation_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    generate = sub.add_parser(
        "generate",
        parents=[common],
        help="stream the text a generation model writes after PROMPT",
        description="Print the text MODEL writes after PROMPT to stdout as it is generated.",
    )
    generate.add_argument("model")
    generate.add_argument("prompt")
    generate.add_argument("--version", default="", help="model version (default: the server's)")
    sampling = generate.add_argument_group("sampling (left out: the server's defaults)")
    sampling.add_argument("--max-new-tokens", type=int, help="most tokens to generate")
    sampling.add_argument("--temperature", type=float, help="0 (the default) is greedy")
    sampling.add_argument("--top-k", type=int, help="sample from the k likeliest tokens")
    sampling.add_argument("--top-p", type=float, help="sample from this much probability mass")
    sampling.add_argument("--seed", type=int, help="makes sampling repeatable")
    sampling.add_argument(
        "--stop",
        action="append",
        dest="stop_sequences",
        metavar="TEXT",
        help="stop when this text appears (repeat for more)",
    )
    generate.add_argument(
        "--verbose",
        action="store_true",
        help="at the end, print the model, finish reason and token usage to stderr",
    )
    generate.set_defaults(run=_with_client(_generate))

    count = sub.add_parser(
        "count-tokens", parents=[common], help="tokens PROMPT takes on MODEL, and its context"
    )
    count.add_argument("model")
    count.add_argument("prompt")
    count.add_argument("--version", default="", help="model version (default: the server's)")
    count.set_defaults(run=_with_client(_count_tokens))


#: The ``generate`` flags that are ``Sampling`` fields (``--stop`` fills ``stop_sequences``).
_SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_sequences")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags given on the command line (the rest stay the server's defaults)."""
    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    return {name: value for name, value in given.items() if value is not None}


def _generate(client: Client, args: argparse.Namespace) -> int:
    """Each chunk's text goes to stdout as it arrives; a newline ends the text, also when
    the stream fails midway (the error then follows on stderr)."""
    last: GenerateChunk | None = None
    try:
        for last in client.generate(
            args.model, args.prompt, version=args.version, **_sampling(args)
        ):
            sys.stdout.write(last.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130  # the stream was closed above: the server stops generating
    finally:
        if last is not None:
            print(flush=True)
    if args.verbose and last is not None:
        print(_usage(last), file=sys.stderr)
    return 0


def _usage(last: GenerateChunk) -> str:
    """The last chunk's model, finish reason and token usage as ``key=value`` pairs."""
    fields = [f"model={last.model}", f"version={last.version}"]
    fields.append(f"finish_reason={last.finish_reason}")
    if last.usage is not None:
        fields.append(f"prompt_tokens={last.usage.prompt_tokens}")
        fields.append(f"completion_tokens={last.usage.completion_tokens}")
    if last.fallback_reason:
        fields.append(f"fallback_reason={last.fallback_reason!r}")
    return " ".join(fields)


def _count_tokens(client: Client, args: argparse.Namespace) -> int:
    count = client.count_tokens(args.model, args.prompt, version=args.version)
    print(f"{count.token_count} tokens (the model's context: {count.max_context})")
    return 0
