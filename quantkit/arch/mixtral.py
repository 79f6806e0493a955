"""Mixtral: llama attention; the MLP is ``block_sparse_moe`` = a router ``gate`` (``nn.Linear``)
and ``switch_mlp`` (an mlx-lm ``SwitchGLU``: ``gate_proj``/``up_proj``/``down_proj`` expert
stacks). The router reads the normed input too, so it is a target of the norm's scale group."""

from .llama import ATTN
from .spec import ArchSpec, ScaleGroup

EXPERTS = ("block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.switch_mlp.up_proj")

MIXTRAL = ArchSpec(
    model_types=("mixtral",),
    shared_inputs=(ATTN, EXPERTS),
    scale_groups=(
        ScaleGroup("input_layernorm", ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", ("block_sparse_moe.gate", *EXPERTS),
                   scope="block_sparse_moe"),
        ScaleGroup("block_sparse_moe.switch_mlp.up_proj",
                   ("block_sparse_moe.switch_mlp.down_proj",), kind="linear"),
    ),
)
