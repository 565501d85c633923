"""The peer servers of ``bench/run.py``: PyTriton and MLServer, started from their own venv.

The peers run in a Python environment of their own (nvidia-pytriton, MLServer and their
pinned dependencies), made by the peers harness's ``setup.sh`` (``../shared/peers``, copied
first as its README says; the venv goes to ``$PEERS_VENV``, by default ``/tmp/peers-venv``).
This module only finds that environment and writes the files the servers need; the servers
themselves are ``bench/pytriton_server.py`` and MLServer with ``bench/mlserver_runtime.py``.
When the environment is missing, :func:`locate` says why in one line and the runner skips
the peer rows; it never fails the run for that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = Path("/tmp/peers-venv")
PEERS = ("pytriton", "mlserver")
# What each peer needs importable in the peers' Python.
IMPORTS = {"pytriton": "pytriton.triton", "mlserver": "mlserver"}


@dataclasses.dataclass
class PeersEnv:
    """Where the peers come from; ``missing`` says why a peer cannot run (absent: it can)."""

    folder: Path
    python: Path
    missing: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def available(self) -> list[str]:
        return [p for p in PEERS if p not in self.missing]

    @property
    def mlserver(self) -> Path:
        return self.python.parent / "mlserver"

    def libdir(self) -> str:
        """The peers' Python's LIBDIR: PyTriton's Python backend stub links libpython
        dynamically and must find the venv's own, not the system's."""
        done = subprocess.run(
            [
                str(self.python),
                "-c",
                "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return done.stdout.strip()


def default_folder(repo_root: Path) -> Path:
    """``$SLUICE_PEERS``, else ``../shared/peers`` beside the repository."""
    env = os.environ.get("SLUICE_PEERS")
    return Path(env) if env else repo_root.parent / "shared" / "peers"


def locate(folder: Path, venv: Path | None = None) -> PeersEnv | str:
    """The peers' environment, or one line saying why there is none.

    ``venv`` defaults to ``$PEERS_VENV``, else ``/tmp/peers-venv`` (where setup.sh puts
    it). A venv that lacks one peer yields a PeersEnv with that peer in ``missing``."""
    if not folder.is_dir():
        return (
            f"no peers folder at {folder} (give --peers DIR or set SLUICE_PEERS): "
            "PyTriton and MLServer rows skipped"
        )
    venv = venv or Path(os.environ.get("PEERS_VENV") or DEFAULT_VENV)
    python = venv / "bin" / "python"
    if not python.is_file() or not os.access(python, os.X_OK):
        return (
            f"the peers at {folder} are not set up (no Python at {python}): copy the folder "
            f"and run its setup.sh (cp -r {folder} /tmp/peers && /tmp/peers/setup.sh); "
            "PyTriton and MLServer rows skipped"
        )
    env = PeersEnv(folder=folder, python=python)
    for peer, module in IMPORTS.items():
        try:
            done = subprocess.run(
                [str(python), "-c", f"import {module}"], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError) as exc:
            env.missing[peer] = f"{python} failed to start: {exc}"
            continue
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            env.missing[peer] = f"cannot import {module} with {python}: {last}"
    if "mlserver" not in env.missing and not env.mlserver.is_file():
        env.missing["mlserver"] = f"no {env.mlserver}"
    return env


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for servers that cannot bind port 0 and say
    which port they got)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlserver_repository(
    root: Path,
    model: str,
    onnx_file: Path,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    max_batch_size: int = 64,
    max_batch_time_s: float = 0.001,
) -> Path:
    """An MLServer folder serving ``onnx_file`` as ``model`` through
    bench/mlserver_runtime.py. Ports go into settings.json (MLServer's environment
    variables do not override values a settings file sets)."""
    model_dir = root / model
    model_dir.mkdir(parents=True)
    shutil.copyfile(BENCH_DIR / "mlserver_runtime.py", root / "mlserver_runtime.py")
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "grpc_port": grpc_port,
        "http_port": http_port,
        "metrics_port": metrics_port,
        "metrics_endpoint": None,
        "load_models_at_startup": True,
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    model_settings = {
        "name": model,
        "implementation": "mlserver_runtime.OnnxRuntime",
        "max_batch_size": max_batch_size,
        "max_batch_time": max_batch_time_s,
        "parameters": {"uri": str(onnx_file.resolve())},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return root
