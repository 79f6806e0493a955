"""The run report: data only. Rendering (tables, plots) lives in the CLI."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

from .errors import ReportError, describe
from .validate import check_input_file

REPORT_NAME = "quantization_report.json"


@attrs.define
class LayerRecord:
    """What happened to one layer (or one expert of an expert layer, when ``expert`` is set)."""

    path: str
    layer_class: str
    status: str  # "quantized" | "fallback" | "skipped"
    strategy: str | None = None  # the strategy that produced the stored values
    requested: str | None = None  # the strategy the recipe asked for
    rule: int | None = None  # index of the recipe rule (None: the default)
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    reason: str | None = None
    n_params: int = 0
    n_tokens: int | None = None
    #: An expert layer: the rows the model's router sent it (over all experts). ``n_tokens`` is
    #: the same, or, calibrated on every token (``calibrate_all_experts``), every token once
    #: per expert.
    routed_tokens: int | None = None
    hessian_error: float | None = None
    relative_error: float | None = None
    rtn_hessian_error: float | None = None
    damping: float | None = None
    block: int | None = None
    expert: int | None = None
    #: The process that quantized the layer (an expert layer: the lowest of ``expert_ranks``).
    rank: int = 0
    time_s: float = 0.0
    #: An expert layer: the process that quantized each of its experts, in expert order.
    expert_ranks: list[int] | None = None
    #: The layer's contribution to the output KL(float ‖ model), nats per token: the KL of the
    #: float model with only this layer quantized at its spec, as the ``--target-bpw`` KL
    #: sensitivity pass measured it (``None``: not measured).
    output_kl: float | None = None


@attrs.define
class RunReport:
    layers: list[LayerRecord] = attrs.field(factory=list)
    settings: dict[str, Any] = attrs.field(factory=dict)
    bits_per_weight: float | None = None
    time_s: float = 0.0
    world_size: int = 1
    peak_memory_gb: float | None = None
    #: Wall seconds by phase of the job: ``load``, ``check`` (NaN/Inf scan and weight hashes),
    #: ``tokenize``, ``calibrate`` (forward passes and statistics), ``solve`` (quantizing
    #: layers; expert layers include their own calibration passes), ``resume`` (recomputing
    #: finished blocks' outputs), ``write`` (block shards; the final assembly is added to the
    #: returned report, after the report file was written).
    phases: dict[str, float] = attrs.field(factory=dict)
    #: What each block transform and optimizer reported: ``{"block", "kind" ("transform" or
    #: "optimizer"), "name", "figures"}`` in the order they ran.
    block_methods: list[dict[str, Any]] = attrs.field(factory=list)

    def add(self, record: LayerRecord) -> None:
        self.layers.append(record)

    def by_status(self, status: str) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == status]

    def strategy_counts(self) -> dict[str, int]:
        return dict(Counter(r.strategy or "skip" for r in self.layers))

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / REPORT_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def read(cls, directory: str | Path) -> RunReport:
        raw = json.loads((Path(directory) / REPORT_NAME).read_text())
        layers = [LayerRecord(**r) for r in raw.pop("layers")]
        return cls(layers=layers, **raw)


_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def layer_depth(record: LayerRecord) -> int | None:
    """The decoder block a layer belongs to (from the report, else from its path)."""
    if record.block is not None:
        return record.block
    m = _BLOCK.search(record.path)
    return int(m.group(1)) if m else None


def worst_layers(report: RunReport, top: int = 5) -> list[LayerRecord]:
    """The ``top`` layers with the largest relative output error, worst first."""
    measured = [r for r in report.layers if r.relative_error is not None]
    return sorted(measured, key=lambda r: r.relative_error or 0.0, reverse=True)[: max(top, 0)]


def worst_by_output_kl(report: RunReport, top: int = 5) -> list[LayerRecord]:
    """The ``top`` layers contributing most to the output KL (where it was measured), worst
    first."""
    with_kl = [r for r in report.layers if r.output_kl is not None]
    return sorted(with_kl, key=lambda r: r.output_kl or 0.0, reverse=True)[: max(top, 0)]


#: Row orders of :func:`ordered_layers`.
ORDERS = ("depth", "error", "kl")


def ordered_layers(report: RunReport, order: str = "depth") -> list[LayerRecord]:
    """The report's layers by ``order``: ``"depth"`` (decoder block, layers outside the blocks
    last), ``"error"`` (relative output error, worst first) or ``"kl"`` (contribution to the
    output KL, worst first); unmeasured layers last."""
    rows = list(report.layers)
    if order == "error":
        rows.sort(key=lambda r: -1.0 if r.relative_error is None else r.relative_error, reverse=True)
    elif order == "kl":
        rows.sort(key=lambda r: -1.0 if r.output_kl is None else r.output_kl, reverse=True)
    else:
        rows.sort(key=lambda r: (layer_depth(r) is None, layer_depth(r) or 0))
    return rows


def summarize(report: RunReport, top: int = 5) -> dict[str, Any]:
    """What ``quantkit report --json`` prints as its summary: counts, the ``top`` worst layers
    by relative error and by output KL, the total output KL, fallbacks and skipped layers."""
    with_kl = [r for r in report.layers if r.output_kl is not None]
    return {
        "layers": len(report.layers), "strategies": report.strategy_counts(),
        "bits_per_weight": report.bits_per_weight, "time_s": report.time_s,
        "worst": [r.path for r in worst_layers(report, top)],
        "worst_by_output_kl": [r.path for r in worst_by_output_kl(report, top)],
        "output_kl_total": sum(r.output_kl or 0.0 for r in with_kl) if with_kl else None,
        "fallbacks": {r.path: r.reason for r in report.by_status("fallback")},
        "skipped": {r.path: r.reason for r in report.by_status("skipped")},
    }


def read_report(path: str | Path) -> RunReport:
    """The run report of a directory written by ``quantkit quantize`` (or of the directory
    holding the file ``path``); :class:`ReportError` naming what is wrong otherwise."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    if not (directory / REPORT_NAME).exists():
        raise ReportError(f"{path} has no {REPORT_NAME}; pass a directory written by "
                          "`quantkit quantize`")
    check_input_file(directory / REPORT_NAME, "run report", error=ReportError,
                     fix="pass a directory written by `quantkit quantize`")
    try:
        return RunReport.read(directory)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # ValueError: JSON, UTF-8
        raise ReportError(f"{directory / REPORT_NAME} is not a quantkit run report "
                          f"({type(exc).__name__}: {describe(exc)})") from None
