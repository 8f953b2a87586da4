"""A dependency-free SVG line chart, enough for reward-vs-step curves in reports."""
from __future__ import annotations

from html import escape

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               hlines: dict[str, float] | None = None, width: int = 640, height: int = 400) -> str:
    """SVG text: one polyline per named series of (x, y) points, dashed horizontal reference lines."""
    hlines = hlines or {}
    xs = [x for pts in series.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in series.values() for _, y in pts] + list(hlines.values()) or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = 0.05 * ((max(ys) - min(ys)) or 1.0)
    y0, y1 = min(ys) - pad, max(ys) + pad
    left, right, top, bottom = 70, 150, 40, 50
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>']
    for v in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for v in _ticks(x0, x1):
        out.append(f'<text x="{sx(v):.1f}" y="{top + ph + 18}" text-anchor="middle">{v:g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(18,{top + ph / 2}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    legend_y = top + 10
    for i, (name, value) in enumerate(hlines.items()):
        color = "#777" if i == 0 else "#bbb"
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(value):.1f}" y2="{sy(value):.1f}" stroke="{color}" '
                   f'stroke-dasharray="6,4"/>')
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" '
                   f'stroke-dasharray="6,4"/><text x="{left + pw + 35}" y="{legend_y + 4}">{escape(name)}</text>')
        legend_y += 18
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in pts)
        out.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 30}" y1="{legend_y}" y2="{legend_y}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{left + pw + 35}" y="{legend_y + 4}">{escape(name)}</text>')
        legend_y += 18
    out.append("</svg>")
    return "\n".join(out)
