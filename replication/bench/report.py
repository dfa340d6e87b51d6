"""The outputs of ``replication bench``: a table, JSON, Markdown, and optional plots.

JSON schema (``bench.json``, version 1)::

    {"schema": 1, "date": "...", "config": {"size_bytes", "rounds", "stages"},
     "machine": {...}, "tools": {"rsync": "rsync  version 3.2.7 ..." | null, ...},
     "stages": [{"name", "title", "status", "seconds", "figures": [FIGURE...],
                 "details": {...raw rounds...}}],   # status "failed": details
                                                    # {"error", "code"}, no figures
     "summary": {"figures", "met", "missed", "not_judged", "stages_failed": [...]},
     "background_cores": [...]}

    FIGURE = {"stage", "name", "unit", "value", "baseline", "baseline_name",
              "ratio", "target": {"on", "op", "limit", "why"}, "met", "missing", "note"}

``ratio`` is value / baseline; ``met`` is true, false, or null when it cannot be
judged (a baseline tool is missing). Plots are drawn only when matplotlib is
installed; it is not a dependency.
"""

from __future__ import annotations

import json
from pathlib import Path

from .figures import Figure
from .stages import BenchResult

__all__ = ["format_table", "to_dict", "to_markdown", "write_outputs"]

SCHEMA = 1


def to_dict(res: BenchResult) -> dict[str, object]:
    """Return the whole run as the JSON document described in the module docstring."""
    return {
        "schema": SCHEMA,
        "date": res.date,
        "config": {
            "size_bytes": res.config.size,
            "rounds": res.config.rounds,
            "stages": list(res.config.stages),
        },
        "machine": res.machine,
        "tools": res.tools,
        "stages": [
            {
                "name": s.name,
                "title": s.title,
                "status": s.status,
                "seconds": round(s.seconds, 2),
                "figures": [f.to_dict() for f in s.figures],
                "details": s.details,
            }
            for s in res.stages
        ],
        "summary": {**summary(res.figures), "stages_failed": [s.name for s in res.failed]},
        "background_cores": res.background_cores,
    }


def summary(figures: list[Figure]) -> dict[str, int]:
    """Count the figures by verdict."""
    verdicts = [f.met for f in figures]
    return {
        "figures": len(verdicts),
        "met": verdicts.count(True),
        "missed": verdicts.count(False),
        "not_judged": verdicts.count(None),
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "B":
        return f"{value / 1e6:.2f} MB"
    if abs(value) >= 100:
        return f"{value:.0f} {unit}"
    return f"{value:.3g} {unit}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _verdict(f: Figure) -> str:
    if f.met is None:
        return f"missing: {f.missing}" if f.missing else "n/a"
    return "yes" if f.met else "MISSED"


def _rows(res: BenchResult) -> list[list[str]]:
    rows = []
    for f in res.figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}"
        baseline = f"{_fmt(f.baseline, f.unit)} ({f.baseline_name})"
        if f.missing and f.baseline is None:
            baseline = f"missing: {f.missing} ({f.baseline_name})"
        rows.append(
            [f.stage, f.name, _fmt(f.value, f.unit), baseline, ratio, str(f.target), _verdict(f)]
        )
    return rows


_HEAD = ["stage", "figure", "value", "baseline", "ratio", "target", "met"]


def _header(res: BenchResult) -> list[str]:
    m = res.machine
    return [
        f"replication bench: {res.config.size >> 20} MiB images, {res.config.rounds} rounds, "
        f"{res.date}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}",
    ]


def _pending(res: BenchResult) -> list[str]:
    return [f"{s.name} ({s.title})" for s in res.stages if s.status == "not yet available"]


def format_table(res: BenchResult) -> str:
    """Return the plain-text table ``replication bench`` prints."""
    rows = [_HEAD, *_rows(res)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEAD))]
    lines = [*_header(res), ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no figures: no selected stage ran)")
    lines += ["", *_extra_lines(res)]
    s = summary(res.figures)
    lines.append(
        f"summary: {s['figures']} figures: {s['met']} met, {s['missed']} missed, "
        f"{s['not_judged']} not judged"
        + (f"; FAILED stages: {', '.join(f.name for f in res.failed)}" if res.failed else "")
    )
    return "\n".join(lines)


def _extra_lines(res: BenchResult) -> list[str]:
    lines = []
    for s in res.stages:
        if s.name == "replicate" and s.status == "ran":
            d = s.details
            lines.append(
                f"replicate: {d['frames']} frames, {d['bytes_plain'] / 1e6:.0f} MB of source "
                f"data as {d['bytes_framed'] / 1e6:.0f} MB of frames; streaming phase only: "
                f"{_fmt(d['stream_mb_s'], 'MB/s')} vs relay {_fmt(d['relay_stream_mb_s'], 'MB/s')}"
            )
        if s.name == "rpo" and s.status == "ran":
            for p in s.details["phases"]:  # type: ignore[union-attr]
                lines.append(
                    f"rpo: {p['rate_mb_s']:g} MB/s asked, {p['achieved_mb_s']:.1f} written: "
                    f"{p['epochs']} epochs, RPO p50 {_fmt(p['rpo_p50_s'], 's')}, "
                    f"p99 {_fmt(p['rpo_p99_s'], 's')}, max {_fmt(p['rpo_max_s'], 's')}"
                )
        if s.name == "failback" and s.status == "ran":
            d = s.details
            lines.append(
                f"failback: {d['changed_blocks']} blocks changed; speed-up of the reprotect "
                f"{_times(d['speedup_vs_copy'])} vs qemu-img, {_times(d['speedup_vs_full_resync'])}"
                f" vs a full resync; every target equal to the source ({d['verified_with']})"
            )
        if s.name == "fan-in" and s.status == "ran":
            d = s.details
            lines.append(
                f"fan-in: peak {d['peak_streams']} streams, {d['sessions']} sessions in "
                f"{d['window_s']:g} s, {d['offered_mb_s']:g} MB/s of writes offered; "
                f"CPU seconds {d['cpu_s']}"
            )
        if s.status == "failed":
            lines.append(f"{s.name}: FAILED, no figures: {s.details['error']}")
    pending = _pending(res)
    if pending:
        lines.append("not yet available: " + "; ".join(pending))
    missing = [name for name, version in res.tools.items() if version is None]
    if missing:
        lines.append("missing tools (their baselines are not measured): " + ", ".join(missing))
    return lines


def to_markdown(res: BenchResult, plot: str | None = None) -> str:
    """Return the Markdown report (``bench.md``)."""
    lines = ["# replication bench", "", *[f"{h}  " for h in _header(res)], ""]
    lines += ["| " + " | ".join(_HEAD) + " |", "|" + "---|" * len(_HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in _rows(res)]
    lines += ["", "Targets:", ""]
    seen = set()
    for f in res.figures:
        if f.target.why and (str(f.target), f.target.why) not in seen:
            seen.add((str(f.target), f.target.why))
            lines.append(f"- {f.stage} / {f.name}: `{f.target}`: {f.target.why}")
    lines += ["", *[f"{x}  " for x in _extra_lines(res)], ""]
    tools = ", ".join(f"{k}: {v or 'missing'}" for k, v in res.tools.items())
    lines += [f"Tools: {tools}.", ""]
    lines.append(f"Other load on the machine before each timed command: {res.background_cores}")
    if plot:
        lines += ["", f"![ratios]({plot})"]
    return "\n".join(lines) + "\n"


def write_outputs(res: BenchResult, out_dir: Path) -> list[Path]:
    """Write ``bench.json``, ``bench.md`` and (with matplotlib) ``bench.png``; return paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "bench.json"]
    written[0].write_text(json.dumps(to_dict(res), indent=2, default=str) + "\n")
    plot = _plot(res, out_dir / "bench.png")
    if plot is not None:
        written.append(plot)
    md = out_dir / "bench.md"
    md.write_text(to_markdown(res, plot.name if plot else None))
    written.append(md)
    return written


def _plot(res: BenchResult, path: Path) -> Path | None:
    """Draw each figure's ratio beside its target; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figs = [f for f in res.figures if f.ratio is not None]
    if not figs:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(figs) + 1))
    labels = [f"{f.stage}: {f.name} vs {f.baseline_name}" for f in figs]
    colors = ["tab:green" if f.met else "tab:red" for f in figs]
    ax.barh(labels, [f.ratio for f in figs], color=colors)
    for i, f in enumerate(figs):
        if f.target.on == "ratio":
            ax.plot([f.target.limit] * 2, [i - 0.4, i + 0.4], color="black")
    ax.set_xlabel("value / baseline (black: target)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
