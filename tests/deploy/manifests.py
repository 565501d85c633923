"""Rendering the Kubernetes manifests with a real kustomize, and the objects they hold."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.toolchains import missing

REPO = Path(__file__).resolve().parent.parent.parent
KUBERNETES = REPO / "deploy" / "kubernetes"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
#: Every kustomization users render, as README's "Deploy on Kubernetes / KServe" names them.
RENDERED = (
    "deploy/kubernetes/overlays/cpu",
    "deploy/kubernetes/overlays/gpu",
    "deploy/kubernetes/overlays/servicemonitor",
    "deploy/kubernetes/kserve",
)

Object = dict[str, Any]


def kustomize() -> list[str]:
    """The command that renders a kustomization: a standalone ``kustomize build``, else
    the kustomize built into ``kubectl`` (``kubectl kustomize``)."""
    if (binary := shutil.which("kustomize")) is not None:
        return [binary, "build"]
    if (kubectl := shutil.which("kubectl")) is not None:
        return [kubectl, "kustomize"]
    missing(
        "needs kustomize to render deploy/kubernetes: kubectl (which has kustomize built in) "
        "or a standalone kustomize on PATH"
    )


@functools.cache
def render(path: str) -> tuple[Object, ...]:
    """The objects ``path`` renders to (README's command, run here)."""
    done = subprocess.run(
        [*kustomize(), str(REPO / path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"kustomize failed on {path}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def objects(path: str, kind: str) -> list[Object]:
    return [o for o in render(path) if o["kind"] == kind]


def one(path: str, kind: str, name: str | None = None) -> Object:
    found = [o for o in objects(path, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{path}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def crd_schema(api_version: str, kind: str) -> Object | None:
    """The vendored schema of a custom resource (None: not a custom resource we use)."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{group}_{kind}_{version}.json.gz"
    if not path.is_file():
        return None
    schema: Object = json.loads(gzip.decompress(path.read_bytes()))
    return strict(schema)


def strict(schema: Object) -> Object:
    """A structural schema as the API server's strict field validation reads it: an
    object with declared properties accepts no others, unless it says it preserves them."""
    closed = dict(schema)
    if "properties" in closed:
        closed["properties"] = {k: strict(v) for k, v in closed["properties"].items()}
        if "additionalProperties" not in closed and not closed.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            closed["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(closed.get(key), dict):
            closed[key] = strict(closed[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in closed:
            closed[key] = [strict(part) for part in closed[key]]
    return closed


def containers(workload: Object) -> Iterator[Object]:
    spec = workload["spec"]
    pod = spec["template"]["spec"] if "template" in spec else spec
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


def port_named(container: Object, name: str) -> int:
    ports = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    assert len(ports) == 1, f"container {container['name']} has no port named {name}"
    return int(ports[0])
