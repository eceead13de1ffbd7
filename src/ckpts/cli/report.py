"""``ckpts report``: one self-contained HTML page on a run (inline CSS and SVG, no network).

The page holds the recommended checkpoint and the reason, one SVG chart per
metric (kept checkpoints filled, deleted steps faint, best a star, pinned a
diamond), the table of checkpoints (metrics, size, age, markers) and the
retention and disk-use summary. Nothing is fetched: no scripts, fonts or images
from elsewhere, so the file can be mailed or archived as it is. No torch, no
matplotlib: the charts are written by hand.
"""

from __future__ import annotations

import datetime
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

from rich.filesize import decimal

from ckpts._format.catalog import Checkpoint, list_checkpoints
from ckpts._format.index import read_manifest
from ckpts._run.policy import Mode
from ckpts.cli._common import (
    epoch_cell,
    metric_direction,
    printable,
    ranking_mode,
    table_metrics,
)
from ckpts.cli.curves import Curve, Point, Recommendation, metric_curve, recommend, run_name
from ckpts.errors import CheckpointError, InvalidArgumentError
from ckpts.storage import open_storage
from ckpts.storage._port import Storage, url_protocol

WIDTH, HEIGHT = 460, 250
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 40

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#1d2330;background:#fff;max-width:1000px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:26px 0 8px}
.muted{color:#6b7280}.recommend{border-left:4px solid #2f7d32;background:#eef7ee;
padding:10px 14px;margin:14px 0}.recommend code{font-size:13px}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 10px;text-align:right;
border-bottom:1px solid #e5e7eb}th{background:#f3f4f6}td.left,th.left{text-align:left}
tr.deleted td{color:#a0a4ab}tr.recommended td{background:#eef7ee}
#curves{display:flex;flex-wrap:wrap;gap:8px 18px}details{margin-top:10px}
summary{cursor:pointer;color:#4b5563}svg text{font:11px system-ui,sans-serif;
fill:#4b5563}.tag{display:inline-block;border-radius:3px;padding:0 5px;margin-right:3px;
font-size:11px;background:#e0e7ff}.tag.best{background:#fde68a}.tag.deleted{background:#eee}
"""


def write_report(run: Storage | str | os.PathLike[str], out: Path, *, metric: str | None = None,
                 mode: Mode | None = None, now: datetime.datetime | None = None) -> Path:
    """Write the HTML report of ``run`` to ``out``.

    Args:
        run: the run: a directory, a URL or a storage.
        out: the HTML file to write.
        metric: the metric that picks the recommended checkpoint (default:
            ``val_loss``, else ``eval_loss``, else the first metric seen whose name
            tells its better end, else the first metric seen).
        mode: whether lower (``min``) or higher (``max``) values of ``metric`` are
            better (default: known from its name, else ``min``). The other metrics'
            charts star their best point only when their name tells which end is best.
        now: the time ages are counted from (default: now).

    Returns:
        ``out``.

    Raises:
        InvalidArgumentError: the run has no checkpoints, or none has ``metric``.
    """
    run = open_storage(run)
    checkpoints = list_checkpoints(run)
    if not checkpoints:
        raise InvalidArgumentError(f"{run.location} has no committed checkpoints to report on")
    names = table_metrics(checkpoints)
    if metric is None:
        metric = _default_metric(names)
    elif metric not in names:
        raise InvalidArgumentError(
            f"no checkpoint in {run.location} has the metric {metric!r}; metrics present: "
            f"{', '.join(names) or 'none'}")
    directions = {name: metric_direction(name) for name in names}
    advice = None
    if metric is not None:
        ranked_by = directions[metric] = ranking_mode(metric, mode)
        advice = recommend(run, metric, ranked_by, checkpoints=checkpoints)
    curves = [metric_curve(run, name, direction, checkpoints=checkpoints)
              for name, direction in directions.items()]
    page = render(run, checkpoints, curves, advice,
                  now=now or datetime.datetime.now(datetime.timezone.utc),
                  export_format="safetensors" if advice is None
                  else _export_format(run, advice.checkpoint))
    out.write_text(page, encoding="utf-8")
    return out


def _default_metric(names: Sequence[str]) -> str | None:
    """The metric a report ranks by when none is given (see :func:`write_report`)."""
    for preferred in ("val_loss", "eval_loss"):
        if preferred in names:
            return preferred
    known = [name for name in names if metric_direction(name) is not None]
    return next(iter(known or names), None)


def _export_format(run: Storage, checkpoint: Checkpoint) -> str:
    """``hf`` when the checkpoint's module has a recorded Hugging Face config (which
    ``ckpts export --format hf`` needs), else ``safetensors``."""
    try:
        objects = read_manifest(run, checkpoint.name, tensor_entries=False)["objects"]
    except (CheckpointError, OSError):  # export would fail too; the safe suggestion
        return "safetensors"
    modules = [obj for obj in objects.values() if obj.get("kind") == "module"]
    chosen = objects.get("model") or (modules[0] if len(modules) == 1 else {})
    return "hf" if isinstance(chosen.get("hf_config"), dict) else "safetensors"


def render(run: Storage, checkpoints: Sequence[Checkpoint], curves: Sequence[Curve],
           advice: Recommendation | None, *, now: datetime.datetime,
           export_format: str = "safetensors") -> str:
    """The report page as a string (see :func:`write_report`); ``export_format``: the
    format of the export command it suggests (``hf`` or ``safetensors``)."""
    title = _html(f"ckpts report: {run_name(run)}")
    where = run.location if url_protocol(run.location) else str(Path(run.location).resolve())
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f'<div class="muted">{_html(where)} &middot; generated '
        f"{now.strftime('%Y-%m-%d %H:%M UTC')}</div>",
        _recommendation(advice, export_format),
        '<h2>Metric curves</h2><div id="curves">',
        *(_chart(curve) for curve in curves if curve.points),
        "</div>" if any(c.points for c in curves) else '<p class="muted">No metrics.</p></div>',
        "<h2>Checkpoints</h2>",
        _table(checkpoints, curves, now=now,
               recommended=advice.checkpoint.step if advice is not None else None),
        "<h2>Retention and disk use</h2>", _disk(run, checkpoints, curves),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _html(text: str) -> str:
    """Text of the run (names, tags, paths) for the page: escaped for the terminal first
    (a lone surrogate cannot even be written as UTF-8), then for HTML."""
    return html.escape(printable(text))


def _recommendation(advice: Recommendation | None, export_format: str) -> str:
    if advice is None:
        return ('<div class="recommend" id="recommendation">No checkpoint has a metric to '
                "rank by; attach one with <code>add_metrics</code> or "
                "<code>ckpts evaluate</code>.</div>")
    path = _html(str(advice.checkpoint.path))
    out = "OUT" if export_format == "hf" else "model.safetensors"
    return (f'<div class="recommend" id="recommendation" data-step="{advice.checkpoint.step}">'
            f"<b>Recommended:</b> {_html(advice.reason)}.<br><code>{path}</code><br>"
            f'<span class="muted">Export it: <code id="export">ckpts export {path} {out} '
            f"--format {export_format}</code></span></div>")


def _chart(curve: Curve) -> str:
    """One metric's curve as an inline SVG chart (NaN and infinite values left out)."""
    finite = [p for p in curve.points if math.isfinite(p.value)]
    if not finite:
        return ""
    x_low, x_high = _span([p.step for p in finite])
    y_low, y_high = _span([p.value for p in finite])
    pad = (y_high - y_low) * 0.06
    y_low, y_high = y_low - pad, y_high + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + (step - x_low) / (x_high - x_low) * plot_w

    def y(value: float) -> float:
        return TOP + (y_high - value) / (y_high - y_low) * plot_h

    name = _html(curve.metric)
    out = [f'<div class="chart"><svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
           f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           f'data-metric="{name}" aria-label="{name} by step">',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
           'stroke="#d1d5db"/>']
    for tick in _ticks(y_low, y_high):
        ty = y(tick)
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{ty:.1f}" y2="{ty:.1f}" '
                   f'stroke="#e5e7eb"/><text x="{LEFT - 6}" y="{ty + 4:.1f}" '
                   f'text-anchor="end">{tick:.4g}</text>')
    for tick in _ticks(x_low, x_high):
        if tick == int(tick):
            out.append(f'<text x="{x(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" '
                       f'text-anchor="middle">{int(tick)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" text-anchor="middle">step'
               f'</text><text x="14" y="{TOP + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {TOP + plot_h / 2})">{name}</text>')
    line = " ".join(f"{x(p.step):.1f},{y(p.value):.1f}" for p in finite)
    out.append(f'<polyline points="{line}" fill="none" stroke="#2563eb" stroke-width="1.5"/>')
    out += [_marker(p, x(p.step), y(p.value), curve.metric) for p in finite]
    out.append("</svg></div>")
    return "".join(out)


def _marker(point: Point, cx: float, cy: float, metric: str) -> str:
    classes = " ".join(["point", "kept" if point.kept else "deleted", *point.markers])
    label = (f"step {point.step}: {metric} {point.value:.4g}"
             + ("" if point.kept else " (deleted)")
             + (f" [{', '.join(point.markers)}]" if point.markers else ""))
    common = f'class="{classes}" data-step="{point.step}"'
    tooltip = f"<title>{_html(label)}</title>"
    if not point.kept:
        return (f'<circle {common} cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="none" '
                f'stroke="#2563eb" opacity="0.35">{tooltip}</circle>')
    if "best" in point.markers:
        star = " ".join(f"{cx + r * math.sin(i * math.pi / 5):.1f},"
                        f"{cy - r * math.cos(i * math.pi / 5):.1f}"
                        for i, r in ((i, 9.0 if i % 2 == 0 else 3.8) for i in range(10)))
        return (f'<polygon {common} points="{star}" fill="#f59e0b" stroke="#1f2937" '
                f'stroke-width="0.8">{tooltip}</polygon>')
    if "pinned" in point.markers:
        diamond = f"{cx:.1f},{cy - 6:.1f} {cx + 6:.1f},{cy:.1f} {cx:.1f},{cy + 6:.1f} " \
                  f"{cx - 6:.1f},{cy:.1f}"
        return (f'<polygon {common} points="{diamond}" fill="#7c3aed" stroke="#1f2937" '
                f'stroke-width="0.8">{tooltip}</polygon>')
    return f'<circle {common} cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="#2563eb">{tooltip}</circle>'


def _table(checkpoints: Sequence[Checkpoint], curves: Sequence[Curve], *,
           now: datetime.datetime, recommended: int | None) -> str:
    """The kept checkpoints, then (folded) the deleted steps the history knows."""
    names = [c.metric for c in curves]
    metric_heads = "".join(f"<th>{_html(n)}</th>" for n in names)
    best_of: dict[int, list[str]] = {}
    for curve in curves:
        for p in curve.points:
            if "best" in p.markers:
                best_of.setdefault(p.step, []).append(curve.metric)
    latest = checkpoints[-1].step if checkpoints else None
    rows = [f'<table id="checkpoints"><thead><tr><th>step</th><th class="left">created</th>'
            f"<th>age</th><th>size</th><th>epoch</th>{metric_heads}"
            '<th class="left">markers</th></tr></thead><tbody>']
    for c in checkpoints:
        tags = ["recommended"] if c.step == recommended else []
        tags += [f"best({n})" for n in best_of.get(c.step, [])]
        tags += ["latest"] if c.step == latest else []
        tags += [f"pinned:{t}" if t != "pinned" else "pinned" for t in c.tags]
        cells = "".join(f"<td>{_number(c.metrics.get(n))}</td>" for n in names)
        badges = "".join(f'<span class="tag{" best" if t.startswith(("best", "rec")) else ""}">'
                         f"{_html(t)}</span>" for t in tags)
        css = "kept recommended" if c.step == recommended else "kept"
        rows.append(f'<tr class="{css}" data-step="{c.step}"><td>{c.step}</td>'
                    f'<td class="left">{c.created.strftime("%Y-%m-%d %H:%M:%S")}</td>'
                    f"<td>{_age(now - c.created)}</td><td>{decimal(c.nbytes)}</td>"
                    f"<td>{_html(epoch_cell(c))}</td>{cells}"
                    f'<td class="left">{badges}</td></tr>')
    rows.append("</tbody></table>")
    deleted: dict[int, dict[str, float]] = {}
    for curve in curves:
        for p in curve.points:
            if not p.kept:
                deleted.setdefault(p.step, {})[curve.metric] = p.value
    if deleted:
        rows.append(f"<details><summary>{len(deleted)} steps deleted by retention (metrics "
                    'from the run\'s history)</summary><table id="deleted"><thead><tr>'
                    f"<th>step</th>{metric_heads}</tr></thead><tbody>")
        for step in sorted(deleted):
            cells = "".join(f"<td>{_number(deleted[step].get(n))}</td>" for n in names)
            rows.append(f'<tr class="deleted" data-step="{step}"><td>{step}</td>{cells}</tr>')
        rows.append("</tbody></table></details>")
    return "".join(rows)


def _disk(run: Storage, checkpoints: Sequence[Checkpoint], curves: Sequence[Curve]) -> str:
    total = sum(c.nbytes for c in checkpoints)
    largest = max(checkpoints, key=lambda c: c.nbytes)
    deleted = {p.step for curve in curves for p in curve.points if not p.kept}
    pinned = [c.step for c in checkpoints if c.tags]
    space = run.free_space()
    free = decimal(space) if space is not None else "no limit known (an object store?)"
    items = [
        f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) != 1 else ''} kept, "
        f"{decimal(total)} in all (largest: step {largest.step}, {decimal(largest.nbytes)})",
        f"{len(deleted)} deleted step{'s' if len(deleted) != 1 else ''} known from the "
        "metrics history" if deleted else "no deleted steps recorded in the metrics history",
        f"always kept: the latest (step {checkpoints[-1].step})"
        + (f" and pinned step{'s' if len(pinned) > 1 else ''} {', '.join(map(str, pinned))}"
           if pinned else "; nothing pinned"),
        f"free space on this filesystem: {free}",
    ]
    return '<ul id="disk">' + "".join(f"<li>{_html(i)}</li>" for i in items) + "</ul>"


def _span(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:
        margin = abs(low) * 0.05 or 1.0
        return low - margin, high + margin
    return low, high


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values inside [low, high], about ``count`` of them."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _number(value: float | None) -> str:
    return "" if value is None else ("NaN" if math.isnan(value) else f"{value:.4g}")


def _age(delta: datetime.timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"
