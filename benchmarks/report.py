"""The table, the rows in the JSON and the chart, all computed from one run's raw samples."""

from __future__ import annotations

import statistics
from pathlib import Path

MIB = 1 << 20
KB = 1024 / 1e6  # KiB -> MB


def pct(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def med(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float] | None) -> str:
    if not values or len(values) < 2:
        return ""
    return f"{min(values):.3g}..{max(values):.3g}"


# (label, unit, key in a side's samples, how to reduce, scale, target)
# target: ("ratio<=", x) ours/upstream at most x; ("ratio>=", x); ("ceiling>=", x) ours / bare
# pty at least x; None for figures shown for information.
METRICS = [
    ("start -> registered", "s", "start_registered_s", "median", 1, None),
    ("start -> leasable", "s", "start_leasable_s", "median", 1, ("ratio<=", 0.5)),
    ("start -> READY=1 (ours)", "s", "start_ready_s", "median", 1, None),
    ("release -> next lease ready", "s", "turnaround_s", "median", 1, ("ratio<=", 1.0)),
    ("release -> leasable (no lease queued)", "s", "release_leasable_s", "median", 1, None),
    ("DriverCall on() p50", "ms", "on_lat_s", "p50", 1000, ("ratio<=", 0.5)),
    ("DriverCall on() p99", "ms", "on_lat_s", "p99", 1000, ("ratio<=", 0.5)),
    ("StreamingDriverCall read() p50", "ms", "read_lat_s", "p50", 1000, ("ratio<=", 0.5)),
    ("StreamingDriverCall read() p99", "ms", "read_lat_s", "p99", 1000, ("ratio<=", 0.5)),
    ("8 concurrent callers", "calls/s", "concurrent_cps", "median", 1, ("ratio>=", 2.0)),
    ("serial client->device", "MB/s", "up_mbps", "median", 1, ("ceiling>=", 0.5)),
    ("serial device->client", "MB/s", "down_mbps", "median", 1, ("ceiling>=", 0.5)),
    ("device->client frames per MiB (client side)", "", "down_frames_per_mib", "median", 1, None),
    ("serial echo 32 B p50", "ms", "echo_lat_s", "p50", 1000, None),
    ("serial echo 32 B p99", "ms", "echo_lat_s", "p99", 1000, ("ratio<=", 0.5)),
    ("idle RSS (all exporter processes)", "MB", "idle_rss_kib", "median", KB, ("ratio<=", 0.25)),
    ("idle PSS (all exporter processes)", "MB", "idle_pss_kib", "median", KB, None),
    ("exporter processes", "", "idle_procs", "median", 1, None),
    ("peak RSS during serial transfer", "MB", "serial_peak_rss_kib", "max", KB, None),
    ("peak PSS during serial transfer", "MB", "serial_peak_pss_kib", "max", KB, None),
    ("CPU per MiB client->device", "ms", "cpu_ms_per_mib_up", "median", 1, ("ratio<=", 0.25)),
    ("CPU per MiB device->client", "ms", "cpu_ms_per_mib_down", "median", 1, ("ratio<=", 0.25)),
    ("CPU per DriverCall on()", "ms", "cpu_ms_per_call", "median", 1, None),
]


def _reduce(values, how: str, scale: float) -> float | None:
    if not values:
        return None
    value = {"median": med, "p50": lambda v: pct(v, 50), "p99": lambda v: pct(v, 99), "max": max}[
        how
    ](values)
    return None if value is None else value * scale


def rows(result: dict) -> list[dict]:
    sides = result.get("sides", {})
    ours, up = sides.get("ours", {}), sides.get("upstream", {})
    pty = med(result.get("ceilings", {}).get("pty_mbps"))
    out = []
    for label, unit, key, how, scale, target in METRICS:
        a = _reduce(ours.get(key), how, scale)
        b = _reduce(up.get(key), how, scale)
        ratio = a / b if a is not None and b else None
        row = {
            "metric": label,
            "unit": unit,
            "ours": a,
            "upstream": b,
            "ratio": ratio,
            "ours_spread": spread(ours.get(key)) if how == "median" else "",
            "target": None,
            "met": None,
        }
        if target:
            kind, limit = target
            if kind == "ratio<=":
                row["target"] = f"<= {limit}x upstream"
                row["met"] = None if ratio is None else ratio <= limit
            elif kind == "ratio>=":
                row["target"] = f">= {limit}x upstream"
                row["met"] = None if ratio is None else ratio >= limit
            else:
                row["target"] = f">= {limit:.0%} of bare pty"
                row["met"] = None if a is None or not pty else a / pty >= limit
                row["of_ceiling"] = None if a is None or not pty else a / pty
        out.append(row)
    growth = ours.get("growth")
    if growth:
        for label, key in (
            (f"RSS growth over {growth['calls']} calls", "rss_kib_after_calls"),
            (f"RSS growth over a {growth['bytes'] // MIB} MiB transfer", "rss_kib_after_serial"),
        ):
            base = growth["rss_kib_before"] if "calls" in label else growth["rss_kib_after_calls"]
            grew = (growth[key] - base) * 1024 / 1e6
            out.append(
                {
                    "metric": label,
                    "unit": "MB",
                    "ours": grew,
                    "upstream": None,
                    "ratio": None,
                    "target": "no growth (< 8 MB)",
                    "met": grew < 8,
                }
            )
    units = result.get("units", {})
    for flavour, label in (("quadlet", "Quadlet unit"), ("plain", "plain systemd unit")):
        if f"{flavour}_s" in units:
            out.append(
                {
                    "metric": f"release -> READY again, {label} (sandbox, polled)",
                    "unit": "s",
                    "ours": units[f"{flavour}_s"],
                    "upstream": None,
                    "ratio": None,
                    "target": None,
                    "met": None,
                }
            )
    ceil = result.get("ceilings", {})
    for label, key in (("bare socat pty pair", "pty_mbps"), ("bare grpcio bidi echo", "grpc_mbps")):
        if ceil.get(key):
            out.append(
                {
                    "metric": f"ceiling: {label}",
                    "unit": "MB/s",
                    "ours": med(ceil[key]),
                    "upstream": None,
                    "ratio": None,
                    "ours_spread": spread(ceil[key]),
                    "target": None,
                    "met": None,
                }
            )
    for row in result.get("scale", {}).get("rows", []):
        out.append({"upstream": None, "ratio": None, "target": None, "met": None, **row})
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(result: dict) -> str:
    header = ["metric", "unit", "ours", "upstream 0.9", "ours/up", "target", "met"]
    lines = [header]
    for row in rows(result):
        met = {True: "yes", False: "NO", None: ""}[row["met"]]
        ratio = row["ratio"]
        if "of_ceiling" in row and row["of_ceiling"] is not None:
            ratio_text = f"{_fmt(ratio)} ({row['of_ceiling']:.0%} pty)"
        else:
            ratio_text = _fmt(ratio)
        lines.append(
            [
                row["metric"],
                row["unit"],
                _fmt(row["ours"]),
                _fmt(row["upstream"]),
                ratio_text,
                row["target"] or "",
                met,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) + " |"
        for line in lines
    ]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    m = result.get("machine", {})
    v = result.get("versions", {})
    foot = (
        f"\n{result.get('mode')} run, {result.get('params', {}).get('rounds')} round(s), "
        f"{m.get('cores')} cores {m.get('cpu')}, {m.get('mem_gib')} GiB, kernel {m.get('kernel')}, "
        f"load {_load(m.get('load_before'))} -> {_load(m.get('load_after'))}; "
        f"ours {v.get('ours')} vs jumpstarter {v.get('upstream')}"
    )
    return "\n".join(text) + foot


def _load(values) -> str:
    return "/".join(f"{x:.1f}" for x in values) if values else "?"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    sides = result.get("sides", {})
    colors = {"ours": "tab:blue", "upstream": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, key, title in (
        (axes[0][0], "on_lat_s", "DriverCall on() round trip"),
        (axes[0][1], "read_lat_s", "StreamingDriverCall read() round trip"),
        (axes[1][0], "echo_lat_s", "serial echo, 32 bytes"),
    ):
        for name, samples in sides.items():
            values = sorted(v * 1000 for v in samples.get(key, []))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                label = f"{name} (p50 {pct(values, 50):.2f}, p99 {pct(values, 99):.2f} ms)"
                ax.step(values, ys, where="post", label=label, color=colors.get(name))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[1][1]
    ceil = result.get("ceilings", {})
    groups = ["client->device", "device->client"]
    bars = {
        "ours": [med(sides.get("ours", {}).get(k)) or 0 for k in ("up_mbps", "down_mbps")],
        "upstream": [med(sides.get("upstream", {}).get(k)) or 0 for k in ("up_mbps", "down_mbps")],
        "bare pty": [med(ceil.get("pty_mbps")) or 0] * 2,
    }
    width = 0.27
    for i, (name, values) in enumerate(bars.items()):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name, color=colors.get(name, "tab:gray"))
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("MB/s")
    grpc = med(ceil.get("grpc_mbps"))
    ax.set_title(
        "serial through the router" + (f" (bare grpcio bidi: {grpc:.0f} MB/s)" if grpc else "")
    )
    ax.legend(fontsize=8)
    m = result.get("machine", {})
    fig.suptitle(
        f"jumpstarter-exporter vs upstream 0.9 ({result.get('mode')} run, "
        f"{m.get('cores')} cores, {m.get('cpu')})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
