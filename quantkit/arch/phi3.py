"""Phi-3: q/k/v fused in ``self_attn.qkv_proj`` and gate/up in ``mlp.gate_up_proj``, so no two
linears share an input. The fused layers' outputs are split (q|k|v, gate|up), so a linear→linear
scaling would have to act on part of their rows: none is listed."""

from .spec import ArchSpec, ScaleGroup

PHI3 = ArchSpec(
    model_types=("phi3",),
    scale_groups=(
        ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), scope="self_attn"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), scope="mlp"),
    ),
)
