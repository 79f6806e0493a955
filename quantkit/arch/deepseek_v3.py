"""DeepSeek-V3 (and mlx-lm's remapped joyai_llm_flash): multi-head latent attention and MoE.

Attention: ``input_layernorm`` feeds ``q_a_proj`` (or ``q_proj`` when ``q_lora_rank`` is unset)
and ``kv_a_proj_with_mqa``; ``q_a_layernorm`` feeds ``q_b_proj``. ``kv_a_layernorm`` feeds the
``embed_q``/``unembed_out`` ``MultiLinear`` heads (one reads it along its weight's second-last
axis), which quantkit does not quantize: no group. Blocks before ``first_k_dense_replace`` have
a dense ``mlp``; the others a router ``mlp.gate`` (``MoEGate``, weight ``(experts, hidden)``),
``mlp.switch_mlp`` expert stacks and ``mlp.shared_experts`` (a dense MLP on the same input).
The routed experts see the tokens gathered (and sorted) by expert, the shared ones every token:
their inputs are the same values but not the same arrays, so they are separate shared-input
groups (and separate Hessians), one scale group.
"""

from .llama import MLP
from .spec import ArchSpec, ScaleGroup

MLA = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")
MLA_NO_LORA = ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
EXPERTS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj")
SHARED = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")

DEEPSEEK_V3 = ArchSpec(
    model_types=("deepseek_v3", "joyai_llm_flash"),
    shared_inputs=(MLA, MLA_NO_LORA, MLP, EXPERTS, SHARED),
    scale_groups=(
        ScaleGroup("input_layernorm", MLA, scope="self_attn"),
        ScaleGroup("input_layernorm", MLA_NO_LORA, scope="self_attn"),
        ScaleGroup("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), scope="self_attn"),
        # dense blocks
        ScaleGroup("post_attention_layernorm", MLP, scope="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
        # MoE blocks: router, routed and shared experts all read the normed input
        ScaleGroup("post_attention_layernorm", ("mlp.gate", *EXPERTS, *SHARED), scope="mlp"),
        ScaleGroup("mlp.switch_mlp.up_proj", ("mlp.switch_mlp.down_proj",), kind="linear"),
        ScaleGroup("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",),
                   kind="linear"),
    ),
)
