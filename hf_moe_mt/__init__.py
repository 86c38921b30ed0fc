"""hf_moe_mt: a sparse Mixture-of-Experts encoder-decoder for multilingual translation (DeepSpeed-MoE /
Z-code M3), usable through the transformers Auto* classes. Importing registers model_type "moe_mt" and the
translation pipeline, and changes nothing else in the process: the CPU speed backend (`hf_moe_mt.backends`) and
process memory settings (`hf_moe_mt.runtime`) are applied only by our commands and scripts or an explicit call."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from .configuration_moe_mt import MoEMTConfig
from .modeling_moe_mt import (
    MoEMTForConditionalGeneration,
    MoEMTModel,
    MoEMTPreTrainedModel,
    dropless_routing,
)
from .moe import RouterInfo, SparseMoE
from .pipeline_moe_mt import MoEMTTranslationPipeline, register_translation_pipeline
from .tokenization_moe_mt import MoEMTTokenizer

AutoConfig.register(MoEMTConfig.model_type, MoEMTConfig, exist_ok=True)
AutoModel.register(MoEMTConfig, MoEMTModel, exist_ok=True)
AutoModelForSeq2SeqLM.register(MoEMTConfig, MoEMTForConditionalGeneration, exist_ok=True)
# transformers 5 removed pipeline("translation"); bring it back for seq2seq translation models.
register_translation_pipeline()
AutoTokenizer.register(MoEMTConfig, tokenizer_class=MoEMTTokenizer, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "MoEMTConfig",
    "MoEMTForConditionalGeneration",
    "MoEMTModel",
    "MoEMTPreTrainedModel",
    "MoEMTTranslationPipeline",
    "MoEMTTokenizer",
    "RouterInfo",
    "SparseMoE",
    "dropless_routing",
    "__version__",
]
