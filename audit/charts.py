"""Hand-built inline SVG charts for the audit report.

Why not matplotlib: the report is a signed artifact, so it must be byte-identical across runs and
machines; hand-written SVG has no font, hash-salt or date dependence, is a few KB instead of
hundreds, keeps labels as real (selectable, searchable) text, and every label passes through
`markupsafe.escape`, so hostile group names cannot inject markup into the SVG. Charts use the
Okabe-Ito palette plus distinct markers and dash patterns, so they stay readable in grey print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from markupsafe import Markup, escape

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("", "6 3", "2 2", "8 3 2 3", "4 4", "1 3", "10 2", "3 6")
FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif"


def _f(x: float) -> str:
    """Coordinates with 2 decimals: enough precision, stable text."""
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-9 else "0"


@dataclass(frozen=True)
class ForestRow:
    """One estimate with its 95% interval; `note` is shown at the right (e.g. the p-value)."""

    label: str
    estimate: float
    low: float | None = None
    high: float | None = None
    note: str = ""
    highlight: bool = False


def forest_plot(rows: Sequence[ForestRow], *, title: str, x_label: str, reference: float | None = 0.0,
                width: int = 760) -> Markup:
    """Horizontal estimates with interval whiskers, one row per estimate, and a reference line."""
    rows = [r for r in rows if r.estimate is not None and math.isfinite(r.estimate)]
    if not rows:
        return Markup("")
    row_h, top, bottom = 22, 34, 42
    left = min(330, 12 + 7 * max(len(r.label) for r in rows))
    right = 150
    height = top + bottom + row_h * len(rows)
    values = [r.estimate for r in rows]
    values += [v for r in rows for v in (r.low, r.high) if v is not None and math.isfinite(v)]
    if reference is not None:
        values.append(reference)
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 0.05
    ticks = nice_ticks(lo - pad, hi + pad)
    x0, x1 = ticks[0], ticks[-1]
    plot_w = width - left - right

    def sx(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" style="{FONT};font-size:12px">',
           f"<title>{escape(title)}</title>",
           f'<text x="{left}" y="16" font-weight="600">{escape(title)}</text>']
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{_f(x)}" y1="{top - 6}" x2="{_f(x)}" y2="{height - bottom + 4}" stroke="#ddd"/>')
        out.append(f'<text x="{_f(x)}" y="{height - bottom + 18}" text-anchor="middle" fill="#444">{escape(_fmt_tick(t))}</text>')
    if reference is not None and x0 <= reference <= x1:
        x = sx(reference)
        out.append(f'<line x1="{_f(x)}" y1="{top - 8}" x2="{_f(x)}" y2="{height - bottom + 4}" stroke="#333" '
                   f'stroke-dasharray="4 3"/>')
    for i, r in enumerate(rows):
        y = top + row_h * i + row_h / 2
        colour = "#D55E00" if r.highlight else "#0072B2"
        out.append(f'<text x="{left - 8}" y="{_f(y + 4)}" text-anchor="end">{escape(r.label)}</text>')
        if r.low is not None and r.high is not None and math.isfinite(r.low) and math.isfinite(r.high):
            out.append(f'<line x1="{_f(sx(r.low))}" y1="{_f(y)}" x2="{_f(sx(r.high))}" y2="{_f(y)}" '
                       f'stroke="{colour}" stroke-width="2"/>')
            for v in (r.low, r.high):
                out.append(f'<line x1="{_f(sx(v))}" y1="{_f(y - 5)}" x2="{_f(sx(v))}" y2="{_f(y + 5)}" '
                           f'stroke="{colour}" stroke-width="2"/>')
        shape = (f'<rect x="{_f(sx(r.estimate) - 4)}" y="{_f(y - 4)}" width="8" height="8" fill="{colour}"/>'
                 if r.highlight else f'<circle cx="{_f(sx(r.estimate))}" cy="{_f(y)}" r="4.5" fill="{colour}"/>')
        out.append(shape)
        if r.note:
            out.append(f'<text x="{width - right + 10}" y="{_f(y + 4)}" fill="#333">{escape(r.note)}</text>')
    out.append(f'<text x="{_f(left + plot_w / 2)}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append("</svg>")
    return Markup("\n".join(out))


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[tuple[float, float], ...]


def line_chart(series: Iterable[Series], *, title: str, x_label: str, y_label: str,
               width: int = 520, height: int = 300) -> Markup:
    """Lines with markers (one per series) and a legend; for degradation curves."""
    series = [s for s in series if s.points]
    if not series:
        return Markup("")
    left, right, top, bottom = 58, 170, 30, 46
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if y is not None and math.isfinite(y)]
    if not ys:
        return Markup("")
    xt = nice_ticks(min(xs), max(xs), 5)
    pad = (max(ys) - min(ys)) * 0.05 or 0.01
    yt = nice_ticks(min(ys) - pad, max(ys) + pad, 5)
    pw, ph = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + (v - xt[0]) / ((xt[-1] - xt[0]) or 1) * pw

    def sy(v: float) -> float:
        return top + ph - (v - yt[0]) / ((yt[-1] - yt[0]) or 1) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" style="{FONT};font-size:11px">',
           f"<title>{escape(title)}</title>",
           f'<text x="{left}" y="16" font-weight="600" font-size="12">{escape(title)}</text>']
    for t in yt:
        out.append(f'<line x1="{left}" y1="{_f(sy(t))}" x2="{left + pw}" y2="{_f(sy(t))}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 6}" y="{_f(sy(t) + 4)}" text-anchor="end" fill="#444">{escape(_fmt_tick(t))}</text>')
    for t in xt:
        out.append(f'<line x1="{_f(sx(t))}" y1="{top + ph}" x2="{_f(sx(t))}" y2="{top + ph + 4}" stroke="#444"/>')
        out.append(f'<text x="{_f(sx(t))}" y="{top + ph + 16}" text-anchor="middle" fill="#444">{escape(_fmt_tick(t))}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for i, s in enumerate(series):
        colour, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        pts = [(x, y) for x, y in s.points if y is not None and math.isfinite(y)]
        path = " ".join(f"{_f(sx(x))},{_f(sy(y))}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        for x, y in pts:
            out.append(_marker(i, sx(x), sy(y), colour))
        ly = top + 6 + i * 16
        out.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 34}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"{dash_attr}/>')
        out.append(_marker(i, left + pw + 23, ly, colour))
        # Legend labels are shortened to fit; the full name stays available as a tooltip.
        out.append(f'<text x="{left + pw + 40}" y="{ly + 4}"><title>{escape(s.name)}</title>'
                   f'{escape(_short(s.name, 20))}</text>')
    out.append(f'<text x="{_f(left + pw / 2)}" y="{height - 8}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {_f(top + ph / 2)}) rotate(-90)" text-anchor="middle">'
               f"{escape(y_label)}</text>")
    out.append("</svg>")
    return Markup("\n".join(out))


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _marker(i: int, x: float, y: float, colour: str) -> str:
    kind = i % 4
    if kind == 0:
        return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="3.5" fill="{colour}"/>'
    if kind == 1:
        return f'<rect x="{_f(x - 3.5)}" y="{_f(y - 3.5)}" width="7" height="7" fill="{colour}"/>'
    if kind == 2:
        return (f'<polygon points="{_f(x)},{_f(y - 4.5)} {_f(x + 4.5)},{_f(y + 3.5)} {_f(x - 4.5)},{_f(y + 3.5)}" '
                f'fill="{colour}"/>')
    return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="3.5" fill="#fff" stroke="{colour}" stroke-width="2"/>'


def verdict_bar(n_pass: int, n_fail: int, width: int = 320) -> Markup:
    """A one-line pass/fail proportion bar for the verdict box."""
    total = max(n_pass + n_fail, 1)
    wp = round(width * n_pass / total, 2)
    label = f"{n_pass} of {n_pass + n_fail} gates pass"
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} 14" width="{width}" height="14">'
        f"<title>{escape(label)}</title>"
        f'<rect x="0" y="0" width="{_f(wp)}" height="14" fill="#009E73"/>'
        f'<rect x="{_f(wp)}" y="0" width="{_f(width - wp)}" height="14" fill="#D55E00"/></svg>')
