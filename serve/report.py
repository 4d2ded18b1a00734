"""The load test's report: a table for the terminal, a latency-against-throughput plot, and loadtest.json."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torchship.serve.client import Target
from torchship.serve.loadtest import Level
from torchship.train.plots import pyplot


def table(levels: list[Level]) -> str:
    head = (
        f"{'load':>10} {'requests':>8} {'errors':>8} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'p99.9':>7} {'max ms':>7} {'accuracy':>8} {'queue ms':>8}"
    )
    rows = [head, "-" * len(head)]
    for lv in levels:
        load = f"{lv.rate:g}/s" if lv.rate else f"c={lv.concurrency}"
        err = sum(lv.errors.values())
        lat = lv.latency_ms
        queue = lv.server.get("queue_ms")
        rows.append(
            f"{load:>10} {lv.requests:>8} {err:>8} {lv.throughput:>8.1f} {lat['p50']:>7.2f} {lat['p90']:>7.2f} "
            f"{lat['p99']:>7.2f} {lat['p99.9']:>7.2f} {lat['max']:>7.2f} {lv.accuracy:>8.4f} "
            f"{queue if queue is None else round(queue, 3)!s:>8}"
        )
    return "\n".join(rows)


def plot(levels: list[Level], path: Path, title: str = "") -> None:
    plt = pyplot()
    import matplotlib.ticker as ticker  # lazily, with pyplot (train/plots.py says why)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [lv.throughput for lv in levels]
    for p in ("p50", "p90", "p99", "p99.9"):
        ax.plot(x, [lv.latency_ms[p] for lv in levels], "o-", label=p)
    for lv in levels:
        ax.annotate(
            f"{lv.rate:g}/s" if lv.rate else f"c={lv.concurrency}",
            (lv.throughput, lv.latency_ms["p50"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set(xlabel="throughput (requests/s)", ylabel="latency (ms)", yscale="log", title=title or "latency vs load")
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(levels: list[Level], out_dir: Path | str, target: Target, title: str = "") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "target": {"host": target.host, "port": target.port, "model": target.model},
        "levels": [asdict(lv) for lv in levels],
    }
    (out / "loadtest.json").write_text(json.dumps(report, indent=2))
    plot(levels, out / "loadtest.png", title)
    return out / "loadtest.json"
