"""Qwen2-MoE (Qwen1.5-MoE): Qwen2 attention (q/k/v biases); every block's ``mlp`` is a router
``mlp.gate``, ``mlp.switch_mlp`` expert stacks, a dense ``mlp.shared_expert`` and its scalar gate
``mlp.shared_expert_gate`` (``nn.Linear(hidden, 1)``). All of them read the normed input: the two
routers are targets of the norm's scale group too."""

from .llama import ATTN
from .spec import ArchSpec, ScaleGroup

EXPERTS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj")
SHARED = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")

QWEN2_MOE = ArchSpec(
    model_types=("qwen2_moe",),
    shared_inputs=(ATTN, EXPERTS, SHARED),
    scale_groups=(
        ScaleGroup("input_layernorm", ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm",
                   ("mlp.gate", "mlp.shared_expert_gate", *EXPERTS, *SHARED), scope="mlp"),
        ScaleGroup("mlp.switch_mlp.up_proj", ("mlp.switch_mlp.down_proj",), kind="linear"),
        ScaleGroup("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",), kind="linear"),
    ),
)
