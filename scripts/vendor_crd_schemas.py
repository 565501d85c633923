"""Keep the OpenAPI schemas of the custom resources the manifests use, for offline tests.

    python scripts/vendor_crd_schemas.py CRD.yaml [CRD.yaml ...]

For every served version of each CustomResourceDefinition, writes
``tests/deploy/schemas/<group>_<kind>_<version>.json.gz``: the version's
``openAPIV3Schema`` exactly as the project that owns the resource ships it (KServe's
``config/crd/full/``, the Prometheus Operator's ``example/prometheus-operator-crd/``).
Record where each came from in ``tests/deploy/schemas/SOURCES.md``.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import yaml

TARGET = Path(__file__).resolve().parent.parent / "tests" / "deploy" / "schemas"


def vendor(crd_file: Path) -> list[Path]:
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    written = []
    for version in crd["spec"]["versions"]:
        if not version.get("served", False):
            continue
        schema = version["schema"]["openAPIV3Schema"]
        path = TARGET / f"{group}_{kind}_{version['name']}.json.gz"
        data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
        path.write_bytes(gzip.compress(data, mtime=0))
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    for name in argv:
        for path in vendor(Path(name)):
            print(path.relative_to(TARGET.parent.parent.parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
