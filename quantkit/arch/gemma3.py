"""Gemma 3 (text): four norms per block. Its RMSNorm multiplies by ``1 + weight``
(``offset = 1.0``). ``input_layernorm`` feeds q/k/v and ``pre_feedforward_layernorm`` feeds
gate/up; ``post_attention_layernorm`` and ``post_feedforward_layernorm`` norm the sublayers'
outputs before the residual sum and feed no linear. ``gemma3`` (the multimodal checkpoint)
holds the same text model under ``language_model``."""

from .llama import ATTN, MLP
from .spec import ArchSpec, ScaleGroup

_GROUPS = (
    ScaleGroup("input_layernorm", ATTN, offset=1.0, scope="self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="linear"),
    ScaleGroup("pre_feedforward_layernorm", MLP, offset=1.0, scope="mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), kind="linear"),
)

GEMMA3_TEXT = ArchSpec(model_types=("gemma3_text",), shared_inputs=(ATTN, MLP),
                       scale_groups=_GROUPS)
GEMMA3 = ArchSpec(model_types=("gemma3",), blocks="language_model.model.layers",
                  shared_inputs=(ATTN, MLP), scale_groups=_GROUPS)
