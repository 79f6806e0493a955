"""A picture of a run report: error by layer and by depth, the worst layers named.

Draws with matplotlib's object API on an Agg canvas (no pyplot, no global state) and writes a
PNG. matplotlib is optional: ``pip install 'quantkit[plot]'``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QuantkitError, describe
from .report import LayerRecord, RunReport, layer_depth, worst_layers
from .validate import check_output_file

_BLOCK = re.compile(r"\.layers\.(\d+)\.")
#: Colours by the last component of a layer path; anything else is grey.
_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
          "embed_tokens", "lm_head")


def layer_kind(record: LayerRecord) -> str:
    leaf = record.path.rsplit(".", 1)[-1]
    return leaf if leaf in _KINDS else "other"


def _ordered(report: RunReport) -> list[LayerRecord]:
    """Layers in model order: by block, layers outside the blocks (embedding, head) last."""
    def key(r: LayerRecord) -> tuple[int, int]:
        d = layer_depth(r)
        return (1, 0) if d is None else (0, d)

    return sorted(report.layers, key=key)  # stable: keeps the walker's order within a block


def _x(record: LayerRecord, outside: int) -> int:
    """Where a layer sits on a depth axis: its block, or ``outside`` for the embedding/head."""
    d = layer_depth(record)
    return outside if d is None else d


def _short(path: str) -> str:
    m = _BLOCK.search(path)
    leaf = path.rsplit(".", 1)[-1]
    return f"{m.group(1)}.{leaf}" if m else leaf


def plot_report(report: RunReport, path: str | Path, *, top: int = 5, title: str | None = None,
                dpi: int = 110) -> Path:
    """Write a PNG with three panels: relative output error of every layer in model order (log
    scale; full-precision layers marked, fallbacks outlined red, the ``top`` worst labelled);
    the same error against block depth, one line per layer kind; and GPTQ's Hessian-weighted
    error as a fraction of round-to-nearest's (below 1: error feedback helped)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise QuantkitError(
            "drawing the plot needs matplotlib; install it with pip install 'quantkit[plot]'"
        ) from None
    path = check_output_file(path, "plot", "pass a PNG file name")
    layers = _ordered(report)
    if not layers:
        raise QuantkitError("the run report lists no layers; nothing to plot")
    kinds = sorted({layer_kind(r) for r in layers}, key=lambda k: (_KINDS + ("other",)).index(k))
    palette = {k: f"C{i}" for i, k in enumerate(kinds)}
    worst = {r.path: rank for rank, r in enumerate(worst_layers(report, top))}

    fig = Figure(figsize=(max(10.0, min(0.16 * len(layers) + 3, 30.0)), 9.0))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(1.15, 1.0), hspace=0.55, wspace=0.25)
    ax = fig.add_subplot(grid[0, :])
    errors = [r.relative_error for r in layers]
    measured = [e for e in errors if e is not None and e > 0]
    floor = min(measured) / 3 if measured else 1e-6
    xs = list(range(len(layers)))
    for x, r in enumerate(layers):
        if r.relative_error is not None and r.relative_error > 0:
            ax.bar(x, r.relative_error, color=palette[layer_kind(r)], width=0.8,
                   edgecolor="red" if r.status == "fallback" else "none", linewidth=1.5)
        elif r.status == "skipped":
            ax.plot(x, floor, marker="x", color="0.4", markersize=7)
        if r.path in worst and r.relative_error:
            ax.annotate(f"{_short(r.path)}\n{r.relative_error:.2g}", (x, r.relative_error),
                        xytext=(0, 4 + 18 * (worst[r.path] % 3)), textcoords="offset points",
                        ha="center", fontsize=7, color="darkred",
                        arrowprops={"arrowstyle": "-", "color": "darkred", "linewidth": 0.6})
    ax.set_yscale("log")
    ax.set_xlim(-0.7, len(layers) - 0.3)
    if measured:
        ax.set_ylim(floor / 1.5, max(measured) * 12)
    if len(layers) <= 80:
        ax.set_xticks(xs, [_short(r.path) for r in layers], rotation=90, fontsize=7)
    else:
        starts: dict[int | None, int] = {}
        for x, r in enumerate(layers):
            starts.setdefault(layer_depth(r), x)
        ax.set_xticks(list(starts.values()), [str(d) if d is not None else "head"
                                              for d in starts], fontsize=7)
        ax.set_xlabel("block")
    # block boundaries
    prev = None
    for x, r in enumerate(layers):
        d = layer_depth(r)
        if prev is not None and d != prev:
            ax.axvline(x - 0.5, color="0.85", linewidth=0.8, zorder=0)
        prev = d
    ax.set_ylabel("relative output error")
    ax.set_title("error by layer (model order; red outline: fell back to RTN; "
                 "× kept in full precision)", fontsize=10)
    drawn = [k for k in kinds if any(layer_kind(r) == k and r.relative_error for r in layers)]
    handles: list[Any] = [Patch(color=palette[k], label=k) for k in drawn]
    if any(r.status == "skipped" for r in layers):
        handles.append(Line2D([], [], marker="x", color="0.4", linestyle="none",
                              label="full precision"))
    ax.legend(handles=handles, fontsize=7, ncol=len(handles) if len(handles) <= 6 else (len(handles) + 1) // 2,
              loc="upper left")
    ax.grid(axis="y", which="major", alpha=0.3)

    by_depth = fig.add_subplot(grid[1, 0])
    depths = [d for d in (layer_depth(r) for r in layers) if d is not None]
    head_x = (max(depths) + 1) if depths else 0
    for k in kinds:
        pts = sorted((_x(r, head_x), r.relative_error or 0.0)
                     for r in layers if layer_kind(r) == k and r.relative_error)
        if pts:
            by_depth.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4,
                          color=palette[k], label=k)
    by_depth.set_yscale("log")
    by_depth.set_xlabel("block (depth); out: layers outside the blocks")
    by_depth.set_ylabel("relative output error")
    by_depth.set_title("error by depth", fontsize=10)
    by_depth.grid(alpha=0.3)

    gain = fig.add_subplot(grid[1, 1])
    for k in kinds:
        pts = [(_x(r, head_x), r.hessian_error / r.rtn_hessian_error)
               for r in layers if layer_kind(r) == k and r.hessian_error is not None
               and r.rtn_hessian_error]
        if pts:
            gain.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, color=palette[k],
                         label=k)
    for axis in (by_depth, gain):
        ticks = sorted(set(depths)) + ([head_x] if head_x not in depths and any(
            layer_depth(r) is None for r in layers) else [])
        if len(ticks) <= 40:
            axis.set_xticks(ticks, [str(t) if t < head_x else "out" for t in ticks])
    gain.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    gain.set_xlabel("block (depth); out: layers outside the blocks")
    gain.set_ylabel("Hessian-weighted error / RTN's")
    gain.set_title("error relative to round-to-nearest (<1: better than RTN)", fontsize=10)
    gain.grid(alpha=0.3)

    bpw = f", {report.bits_per_weight:.2f} bits per weight" if report.bits_per_weight else ""
    fig.suptitle(f"{title or 'quantization report'}{bpw}", fontsize=12)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    except (OSError, ValueError) as exc:  # ValueError: a file name suffix matplotlib cannot write
        raise QuantkitError(f"cannot write {path} ({describe(exc)}); choose a writable path") from None
    return path


def plot_comparison(rows: list[dict[str, Any]], path: str | Path, *, title: str | None = None,
                    dpi: int = 110) -> Path:
    """Write a PNG of each model's mean KL to the float model (log scale) against its bits per
    weight, every point labelled with the model's name (the last part of its path) and top-1
    agreement; the 99th percentile of the KL drawn as a hollow marker above it. The points as
    drawn are written into the PNG's ``Description`` text as JSON. ``rows``: dicts
    with ``model``, ``bits_per_weight``, ``kl_mean``, ``kl_p99``, ``top1_agreement`` (as
    :meth:`quantkit.compare.ModelRow.to_dict` gives)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise QuantkitError(
            "drawing the plot needs matplotlib; install it with pip install 'quantkit[plot]'"
        ) from None
    path = check_output_file(path, "the plot")
    shown = [r for r in rows if r["kl_mean"] > 0]
    if not shown:
        raise QuantkitError("no model differs from the reference (every KL is 0); nothing to plot")
    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [r["bits_per_weight"] for r in shown]
    means = ax.scatter(xs, [r["kl_mean"] for r in shown], s=40, color="C0", zorder=3, label="KL mean")
    ax.scatter(xs, [r["kl_p99"] for r in shown], s=40, facecolors="none", edgecolors="C3",
               zorder=3, label="KL 99th percentile")
    lo, hi = min(xs), max(xs)
    near = 0.03 * max(hi - lo, 1.0)
    placed: list[float] = []  # x of the labels already drawn: stack those that would overlap
    for r in sorted(shown, key=lambda r: (r["bits_per_weight"], -r["kl_mean"])):
        x = r["bits_per_weight"]
        ax.plot([x] * 2, [r["kl_mean"], r["kl_p99"]], color="0.75", lw=1, zorder=1)
        name = Path(str(r["model"])).name or str(r["model"])
        k = sum(1 for p in placed if abs(p - x) < near)
        placed.append(x)
        ax.annotate(f"{name}: top-1 {r['top1_agreement']:.1%}", (x, r["kl_mean"]),
                    xytext=(8, 2 - 13 * k), textcoords="offset points", fontsize=8, va="center",
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5} if k else None)
    ax.set_yscale("log")
    ys = [r["kl_mean"] for r in shown] + [r["kl_p99"] for r in shown if r["kl_p99"] > 0]
    ax.set_ylim(min(ys) / 2.5, max(ys) * 1.8)
    pad = max(0.25, 0.12 * (hi - lo))
    ax.set_xlim(lo - pad, hi + 3 * pad)
    ax.set_xlabel("bits per weight (mlx-lm compute_bits_per_weight)")
    ax.set_ylabel("KL(float ‖ quantized), nats per token")
    ax.set_title(title or "fidelity to the float model against size", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    # The drawn points, read back from the plot, in the PNG's text (for tools and tests).
    drawn = [{"model": str(r["model"]), "bits_per_weight": float(x), "kl_mean": float(y)}
             for r, (x, y) in zip(shown, np.asarray(means.get_offsets()).tolist())]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, metadata={"Description": json.dumps(drawn)})
    except (OSError, ValueError) as exc:  # ValueError: a file name suffix matplotlib cannot write
        raise QuantkitError(f"cannot write {path} ({describe(exc)}); choose a writable path") from None
    return path
