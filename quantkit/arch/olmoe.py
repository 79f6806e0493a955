"""OLMoE: llama attention with a ``q_norm``/``k_norm`` over the whole projection (after q/k, so
no scaling concern); every block's ``mlp`` is a router ``mlp.gate`` and ``mlp.switch_mlp``."""

from .llama import ATTN
from .spec import ArchSpec, ScaleGroup

EXPERTS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj")

OLMOE = ArchSpec(
    model_types=("olmoe",),
    shared_inputs=(ATTN, EXPERTS),
    scale_groups=(
        ScaleGroup("input_layernorm", ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate", *EXPERTS), scope="mlp"),
        ScaleGroup("mlp.switch_mlp.up_proj", ("mlp.switch_mlp.down_proj",), kind="linear"),
    ),
)
