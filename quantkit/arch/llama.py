"""Llama-shaped decoders: llama, mistral (mlx-lm loads it as llama), qwen2, qwen3.

A block is ``input_layernorm → self_attn.{q,k,v}_proj → o_proj`` and
``post_attention_layernorm → mlp.{gate,up}_proj → down_proj``. Qwen2's q/k/v biases and
Qwen3's per-head ``q_norm``/``k_norm`` (after the projections) change none of it.
"""

from .spec import ArchSpec, ScaleGroup

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj")

LLAMA = ArchSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    shared_inputs=(ATTN, MLP),
    scale_groups=(
        ScaleGroup("input_layernorm", ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", MLP, scope="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
    ),
    row_wise=("mlp",),
)
