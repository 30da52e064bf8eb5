"""Draw the README's benchmark chart (an SVG of throughput bars) from a benchmark's JSON.

    .venv/bin/python benchmarks/bench_save_restore.py --size-mb 512 --repeat 5 --json \
        > benchmarks/results/save_restore.json
    .venv/bin/python benchmarks/chart.py benchmarks/results/save_restore.json docs/benchmarks.svg

Plain SVG, written by hand: no plotting library to install for one chart, and the file diffs
as text. Our own rows are drawn in a darker colour.
"""

from __future__ import annotations

import argparse
import json
from html import escape
from pathlib import Path

ROW = 26
LABEL_WIDTH = 250
BAR_WIDTH = 380
OURS = "#1f5fa8"
THEIRS = "#9bb7d4"


def render(report: dict[str, object]) -> str:
    rates: dict[str, float] = report["gb_per_s"]  # type: ignore[assignment]
    saves = [(k, v) for k, v in rates.items() if not _is_restore(k)]
    restores = [(k, v) for k, v in rates.items() if _is_restore(k)]
    rows: list[tuple[str, float] | str] = ["save (until durable)", *saves]
    rows += ["restore (cold page cache)" if report.get("cold_cache_restores") else "restore"]
    rows += restores
    top = max(rates.values())
    height = 40 + ROW * len(rows) + 30
    width = LABEL_WIDTH + BAR_WIDTH + 80
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="22" font-size="15" font-weight="bold">Throughput, GB/s (higher is '
        f"better) — {report['state_gb']} GB state, median of {report['repeat']}</text>",
    ]
    y = 40
    for row in rows:
        if isinstance(row, str):
            parts.append(f'<text x="10" y="{y + 17}" font-weight="bold">{escape(row)}</text>')
            y += ROW
            continue
        name, rate = row
        length = max(1.0, BAR_WIDTH * rate / top)
        colour = OURS if name.startswith("tml") else THEIRS
        parts += [
            f'<text x="{LABEL_WIDTH - 8}" y="{y + 17}" text-anchor="end">{escape(name)}</text>',
            f'<rect x="{LABEL_WIDTH}" y="{y + 4}" width="{length:.1f}" height="{ROW - 8}" '
            f'fill="{colour}"/>',
            f'<text x="{LABEL_WIDTH + length + 6:.1f}" y="{y + 17}">{rate:.2f}</text>',
        ]
        y += ROW
    parts.append(
        f'<text x="10" y="{height - 10}" fill="#555">2-core CPU machine, local disk; every '
        "write fsynced. benchmarks/bench_save_restore.py</text>"
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _is_restore(name: str) -> bool:
    return "restore" in name or "load" in name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path, help="JSON from bench_save_restore.py --json")
    parser.add_argument("output", type=Path, help="the SVG to write")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(json.loads(args.report.read_text())))


if __name__ == "__main__":
    main()
