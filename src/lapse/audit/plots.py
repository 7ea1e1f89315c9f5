"""The report's charts as one PNG, a panel per chart (matplotlib, Agg backend, no display).

matplotlib is the optional extra ``lapse[report]`` (part of ``lapse[test]``):
the gateway never imports it unless an admin asks for the charts, and then a
missing install says how to get it.
"""

from __future__ import annotations

import io
from typing import Any

INSTALL_HINT = 'the charts need matplotlib: pip install "lapse[report]"'


class ChartsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def render_png(report: dict[str, Any], *, dpi: int = 100) -> bytes:
    """Four panels: expiries over time, idle time before expiry, expiries by hour, automation suspects."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ChartsUnavailable(INSTALL_HINT) from exc

    fig = Figure(figsize=(12, 8), dpi=dpi, layout="constrained")
    (days_ax, idle_ax), (hour_ax, sus_ax) = fig.subplots(2, 2)
    x = report["expiries"]
    fig.suptitle(f"lapse audit report  {report['window']['since'][:10]} .. {report['window']['until'][:10]}  "
                 f"({x['total']} expiries, {len(report['automation_suspects'])} automation suspects)")

    days = list(x["by_day"])
    reasons = sorted({r for c in x["by_day"].values() for r in c}) or ["idle"]
    bottom = [0] * len(days)
    for reason in reasons:
        heights = [x["by_day"][d].get(reason, 0) for d in days]
        days_ax.bar(range(len(days)), heights, bottom=bottom, label=reason)
        bottom = [b + h for b, h in zip(bottom, heights)]
    step = max(1, len(days) // 8)
    days_ax.set_xticks(range(0, len(days), step), [d[5:] for d in days[::step]])
    days_ax.set(title="Expiries per day (UTC)", ylabel="sessions")
    if days:
        days_ax.legend()

    buckets = report["idle_before_expiry"]["buckets"]
    labels = [_edge(b["le_s"]) for b in buckets]
    idle_ax.bar(range(len(buckets)), [b["count"] for b in buckets], color="tab:orange")
    idle_ax.set_xticks(range(len(buckets)), labels, rotation=45)
    idle_ax.set(title="Idle time before expiry", ylabel="sessions", xlabel="idle for at most")

    hour_ax.bar(range(24), x["by_hour"], color="tab:green")
    hour_ax.set(title="Expiries by hour of day (UTC)", xlabel="hour", ylabel="sessions", xticks=range(0, 24, 3))

    sus = report["automation_suspects"]
    if sus:
        means = [s["evidence"].get("gap_mean_s") or 0.0 for s in sus]
        cvs = [s["evidence"].get("gap_cv") or 0.0 for s in sus]
        sizes = [min(300, 10 + s["evidence"]["samples"] / 10) for s in sus]
        sus_ax.scatter(means, cvs, s=sizes, alpha=0.6, color="tab:red")
        for s, m, c in list(zip(sus, means, cvs))[:10]:
            sus_ax.annotate(s["user"] or "?", (m, c), fontsize=8, xytext=(4, 4), textcoords="offset points")
        sus_ax.set_xscale("log")
    else:
        sus_ax.text(0.5, 0.5, "no automation suspects", ha="center", va="center", transform=sus_ax.transAxes)
    sus_ax.axhline(report["thresholds"]["max_gap_cv"], color="grey", linestyle="--", linewidth=1)
    sus_ax.set(title="Automation suspects: regularity of activity", xlabel="mean gap between activity (s)",
               ylabel="coefficient of variation of gaps")

    for ax in (days_ax, idle_ax, hour_ax):
        ax.set_ylim(bottom=0)
        ax.yaxis.get_major_locator().set_params(integer=True)
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _edge(seconds: float | None) -> str:
    if seconds is None:
        return "more"
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    return f"{int(seconds // 3600)}h"


__all__ = ["INSTALL_HINT", "ChartsUnavailable", "render_png"]
