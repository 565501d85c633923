"""PNG plots of a ``bench/run.py`` result: one figure per model, three panels against
concurrency (throughput in infer/s, p50 and p99 latency in ms), one line per server.

matplotlib is optional (``pip install -e '.[bench]'``) and imported only here, only when
plotting; without it :func:`plot_result` raises :class:`PlottingUnavailable`, which the
runner turns into a note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Line labels; servers not listed keep their key.
LABELS = {
    "null": "no-math grpc.aio",
    "batched": "Sluice (batched)",
    "unbatched": "Sluice (max_batch_size 1)",
    "torch-export": "Sluice (torch.export)",
    "torchscript": "Sluice (TorchScript)",
    "pytriton": "PyTriton",
    "mlserver": "MLServer",
}
PANELS = (("throughput", "infer/s", 1.0), ("p50_us", "p50 ms", 1e-3), ("p99_us", "p99 ms", 1e-3))


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _series(rows: list[dict[str, Any]], key: str, scale: float) -> tuple[list[int], list[float]]:
    points = sorted(
        (r["concurrency"], r[key] * scale)
        for r in rows
        if "error" not in r and r.get(key) is not None
    )
    return [c for c, _ in points], [v for _, v in points]


def plot_model(runs: dict[str, list[dict[str, Any]]], title: str, path: Path) -> Path | None:
    """One figure for one model's served rows; None when no row has a number."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlottingUnavailable(
            "matplotlib is not installed (pip install -e '.[bench]')"
        ) from exc

    servers = [s for s, rows in runs.items() if _series(rows, "throughput", 1.0)[0]]
    if not servers:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    try:
        for ax, (key, ylabel, scale) in zip(axes, PANELS, strict=True):
            for server in servers:
                xs, ys = _series(runs[server], key, scale)
                ax.plot(xs, ys, marker="o", label=LABELS.get(server, server))
            ax.set_xscale("log", base=2)
            concurrencies = sorted({r["concurrency"] for rows in runs.values() for r in rows})
            ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
            ax.set_xlabel("concurrency (requests in flight)")
            ax.set_ylabel(ylabel)
            if key != "throughput":
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    finally:
        plt.close(fig)
    return path


def plot_result(result: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-<model>.png`` in ``out_dir`` for the MLP and the second model."""
    sections = [(result.get("model", {}).get("name", "mlp"), result.get("runs", {}))]
    second = result.get("second_model")
    if second:
        sections.append((second["model"]["name"], second["runs"]))
    written = []
    for model, runs in sections:
        title = f"{model}: perf_analyzer, batch-1 requests ({result.get('timestamp', '')})"
        path = plot_model(runs, title, out_dir / f"{stem}-{model}.png")
        if path is not None:
            written.append(path)
    return written
