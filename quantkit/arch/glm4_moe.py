"""GLM-4.5 (glm4_moe): llama attention (optional per-head q/k norms after the projections); the
first ``first_k_dense_replace`` blocks have a dense ``mlp``, the others DeepSeek-V3's MoE (router
``mlp.gate``, a ``MoEGate``; ``mlp.switch_mlp``; ``mlp.shared_experts``)."""

from .deepseek_v3 import EXPERTS, SHARED
from .llama import ATTN, MLP
from .spec import ArchSpec, ScaleGroup

GLM4_MOE = ArchSpec(
    model_types=("glm4_moe",),
    shared_inputs=(ATTN, MLP, EXPERTS, SHARED),
    scale_groups=(
        ScaleGroup("input_layernorm", ATTN, scope="self_attn"),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", MLP, scope="mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
        ScaleGroup("post_attention_layernorm", ("mlp.gate", *EXPERTS, *SHARED), scope="mlp"),
        ScaleGroup("mlp.switch_mlp.up_proj", ("mlp.switch_mlp.down_proj",), kind="linear"),
        ScaleGroup("mlp.shared_experts.up_proj", ("mlp.shared_experts.down_proj",),
                   kind="linear"),
    ),
)
