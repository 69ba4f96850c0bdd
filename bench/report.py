"""Turn benchmark JSON into charts and markdown tables.

    python bench/report.py                        # every bench/results/<device>/ folder
    python bench/report.py bench/results/<device> # one folder

For each results folder it writes ``report.md`` (a markdown table per topic,
every figure with its ratio to the best peer) and PNG charts for attention:
throughput vs sequence length (one line per provider, one panel per head dim ×
causal × mode, the measured matmul ceiling drawn in) and peak memory vs
sequence length (naive's L² curve against the fused kernels' linear one).
Other topics get speed-up bars. Everything shown comes from the JSON files.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("time_ms", "tflops", "gflops", "gbps", "peak_bytes", "max_error", "speedup_vs_naive",
           "speedup_vs_best_peer", "best_peer", "error", "tokens_per_s", "ratio_a_over_b")
ATTN_KEYS = ("mode", "dtype", "head_dim", "causal", "batch", "heads", "seqlen")


def load(folder: Path) -> Dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}: not valid JSON ({exc})")
        if isinstance(data, dict) and "results" in data:
            out[path.stem] = data
    full = {k: v for k, v in out.items() if not k.endswith("-quick")}
    return full or out  # CI smoke (-quick) results only when nothing else is there


def _is_gpu(data: dict) -> bool:
    return not str(data["environment"].get("device", "")).startswith("CPU")


def _config_key(row: dict) -> tuple:
    return tuple((k, row[k]) for k in sorted(row) if k not in METRICS and k != "provider")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(topic: str, data: dict) -> str:
    env = data["environment"]
    rows: List[dict] = data["results"]
    lines = [
        f"### {topic}",
        "",
        f"{env.get('device')} · torch {env.get('torch')} · triton {env.get('triton')} · commit "
        f"`{str(env.get('commit'))[:10]}` · {env.get('date')} · CPU flags: {', '.join(env.get('cpu_flags', [])) or 'n/a'}",
        "",
    ]
    if data.get("ceilings"):
        lines += ["Measured ceilings: " + ", ".join(f"{k} {_fmt(v)}" for k, v in data["ceilings"].items()), ""]
    metric_cols = [m for m in METRICS if any(m in r for r in rows)]
    groups = defaultdict(list)
    for r in rows:
        groups[_config_key(r)].append(r)
    cfg_cols = [k for k, _ in next(iter(groups))] if groups else []
    header = ["provider"] + cfg_cols + metric_cols
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for key, group in groups.items():
        for r in group:
            vals = [r["provider"]] + [_fmt(v) for _, v in key] + [_fmt(r.get(m, "")) for m in metric_cols]
            lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def attention_charts(data: dict, folder: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "time_ms" in r]
    if not rows:
        return []
    gpu = _is_gpu(data)
    scale, unit = (1.0, "TFLOP/s") if gpu else (1e3, "GFLOP/s")
    panels = sorted({(r["mode"], r["dtype"], r["head_dim"], r["causal"]) for r in rows}, key=str)
    paths = []

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (mode, dtype, d, causal) in zip(axes[0], panels):
        sel = [r for r in rows if (r["mode"], r["dtype"], r["head_dim"], r["causal"]) == (mode, dtype, d, causal)]
        for prov in sorted({r["provider"] for r in sel}):
            pts = sorted((r["seqlen"], r["tflops"] * scale) for r in sel if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ceil = (data.get("ceilings") or {}).get(f"matmul_{dtype}_TFLOPs")
        if ceil:
            ax.axhline(ceil * scale, color="grey", linestyle="--", label=f"{dtype} matmul ceiling")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} {dtype} d={d} {'causal' if causal else 'full'}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"attention throughput — {data['environment'].get('device')}", fontsize=10)
    fig.tight_layout()
    path = folder / "attention_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    mem = [r for r in rows if r.get("peak_bytes") is not None and r["mode"] == "fwd" and not r["causal"]]
    if mem:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        key = sorted({(r["dtype"], r["head_dim"]) for r in mem}, key=str)[0]
        for prov in sorted({r["provider"] for r in mem}):
            pts = sorted((r["seqlen"], r["peak_bytes"] / 2**20) for r in mem
                         if r["provider"] == prov and (r["dtype"], r["head_dim"]) == key)
            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("peak extra memory (MiB)")
        ax.set_title(f"forward peak memory, {key[0]} d={key[1]} (naive grows as L²)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / "attention_memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def speedup_chart(topic: str, data: dict, folder: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if "speedup_vs_best_peer" in r and r["provider"].startswith("ff-")
            and r["provider"] != "ff-naive"]
    if not rows:
        return []
    labels = [f"{r['provider']} " + " ".join(f"{v}" for k, v in _config_key(r)[:4]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [r["speedup_vs_best_peer"] for r in rows])
    ax.axvline(1.0, color="grey", linestyle="--")
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_xlabel("speed-up over the best peer (×)")
    ax.set_title(f"{topic} — {data['environment'].get('device')}", fontsize=9)
    fig.tight_layout()
    path = folder / f"{topic}_speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def render(folder: Path) -> Path:
    topics = load(folder)
    if not topics:
        raise SystemExit(f"{folder}: no benchmark JSON with 'results'")
    parts = [f"# Benchmark report: {folder.name}", ""]
    for topic, data in topics.items():
        charts = attention_charts(data, folder) if topic.startswith("attention") else speedup_chart(topic, data, folder)
        for c in charts:
            parts.append(f"![{c.stem}]({c.name})")
        parts += ["", markdown_table(topic, data)]
    path = folder / "report.md"
    path.write_text("\n".join(parts))
    return path


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folders = [Path(a) for a in args] or sorted(p for p in RESULTS.iterdir() if p.is_dir())
    for folder in folders:
        print(f"wrote {render(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
