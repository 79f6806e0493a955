"""Qwen3-MoE: Qwen3 attention; ``mlp`` is a sparse block (router ``mlp.gate`` + ``mlp.switch_mlp``
expert stacks) or, in ``mlp_only_layers`` / off the ``decoder_sparse_step``, a dense MLP. Both
kinds of block are listed; each group applies where its paths exist."""

from .llama import ATTN, MLP
from .spec import ArchSpec, ScaleGroup

EXPERTS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj")

QWEN3_MOE = ArchSpec(
    model_types=("qwen3_moe",),
    shared_inputs=(ATTN, MLP, EXPERTS),
    scale_groups=(
        ScaleGroup("input_layernorm", ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate", *EXPERTS), scope="mlp"),
        ScaleGroup("mlp.switch_mlp.up_proj", ("mlp.switch_mlp.down_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", MLP, scope="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
    ),
)
