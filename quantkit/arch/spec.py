"""The two record types of an architecture table: :class:`ScaleGroup` and :class:`ArchSpec`.

Imports nothing from quantkit but :mod:`quantkit.errors`, so that every module may import it.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class ScaleGroup:
    """Linears that read one input, and the module that produces that input.

    ``source``: a norm (``kind = "norm"``: its output is ``normalize(x) * (weight + offset)``)
    or a linear (``kind = "linear"``: its output rows feed ``targets``' input columns; usable
    only where the source's output width equals the targets' input width, e.g. not a ``v_proj``
    → ``o_proj`` pair under grouped-query attention).
    ``targets``: the modules reading ``source``'s output (input channels scale together; the
    input dimension is the weight's last axis: ``nn.Linear``, an expert stack ``SwitchLinear``,
    a router such as DeepSeek's ``MoEGate``). A router that reads the same input is a target,
    or scaling would change which experts are chosen.
    ``scope``: the submodule whose output measures a scaling's error (e.g. ``"self_attn"``,
    ``"mlp"``); ``None``: the targets' own outputs.

    Scaling the source's effective weight (``weight + offset``; rows and bias of a linear
    source) by ``s`` and the targets' input columns by ``1 / s`` leaves the block's function
    unchanged: ``tests/test_arch.py`` checks this for every group of every table.
    """

    source: str
    targets: tuple[str, ...]
    kind: str = attrs.field(default="norm", validator=attrs.validators.in_(("norm", "linear")))
    offset: float = 0.0
    scope: str | None = None

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.source, *self.targets)


@attrs.frozen
class ArchSpec:
    """One mlx-lm model family.

    ``blocks``: attribute path from the model to its list of decoder blocks.
    ``shared_inputs``: groups of linears that read the very same input (their Hessians are one).
    ``scale_groups``: norm→linear and linear→linear mappings for activation-aware scaling.
    ``row_wise``: submodules whose output rows each depend on the same input row only (an
    MLP, not attention): calibration on a CPU may run them a slice of rows at a time
    (:class:`~quantkit.pipeline.calibrate.RowChunks`); ``tests/test_arch.py`` checks it.

    Paths are relative to a decoder block. A family whose blocks differ (DeepSeek's dense first
    blocks, Qwen3-MoE's ``mlp_only_layers``) lists the groups of every kind of block: a group
    applies to a block where all of its paths exist (:meth:`shared_inputs_in`,
    :meth:`scale_groups_in`) and is skipped where none or only some do.
    """

    model_types: tuple[str, ...]
    blocks: str = "model.layers"
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    scale_groups: tuple[ScaleGroup, ...] = ()
    row_wise: tuple[str, ...] = ()

    def shared_inputs_in(self, present: set[str] | frozenset[str]) -> list[tuple[str, ...]]:
        """The ``shared_inputs`` groups whose paths are all in ``present`` (a block's paths)."""
        return [g for g in self.shared_inputs if all(p in present for p in g)]

    def scale_groups_in(self, present: set[str] | frozenset[str]) -> list[ScaleGroup]:
        """The ``scale_groups`` whose source and targets are all in ``present``."""
        return [g for g in self.scale_groups if all(p in present for p in g.paths)]

    def paths(self) -> set[str]:
        """Every block-relative path the table names."""
        return {p for g in self.shared_inputs for p in g} | {
            p for g in self.scale_groups for p in g.paths}
