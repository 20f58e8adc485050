"""DeepSeek-V2 as a transformers architecture (MLA + DeepSeekMoE), registered with the Auto classes.

Importing this package registers our classes for ``model_type == "deepseek_v2"`` in this process, and marks
them for ``auto_map`` so that ``save_pretrained`` writes the modeling files beside the weights: the folder then
loads with ``trust_remote_code=True`` where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_deepseek_v2 import DeepseekV2Config
from .modeling_deepseek_v2 import (
    DeepseekV2ForCausalLM,
    DeepseekV2ForSequenceClassification,
    DeepseekV2Model,
    DeepseekV2PreTrainedModel,
)
from .params import count_parameters, load_model_config

AutoConfig.register("deepseek_v2", DeepseekV2Config, exist_ok=True)
for _auto, _cls in (
    (AutoModel, DeepseekV2Model),
    (AutoModelForCausalLM, DeepseekV2ForCausalLM),
    (AutoModelForSequenceClassification, DeepseekV2ForSequenceClassification),
):
    _auto.register(DeepseekV2Config, _cls, exist_ok=True)
    _cls.register_for_auto_class(_auto.__name__)
DeepseekV2Config.register_for_auto_class()

__all__ = [
    "DeepseekV2Config",
    "DeepseekV2Model",
    "DeepseekV2ForCausalLM",
    "DeepseekV2ForSequenceClassification",
    "DeepseekV2PreTrainedModel",
    "count_parameters",
    "load_model_config",
]
