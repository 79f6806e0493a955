"""The run report: data only. Rendering (tables, plots) lives in the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import attrs

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
