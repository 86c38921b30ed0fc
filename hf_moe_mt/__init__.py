"""hf_moe_mt: a sparse Mixture-of-Experts encoder-decoder for multilingual translation (DeepSpeed-MoE /
Z-code M3), usable through the transformers Auto* classes. Importing registers model_type "moe_mt"."""

import os

# Large expert-gradient tensors are freshly allocated every step (zero_grad(set_to_none=True));
# with transparent huge pages the kernel faults them in 8x faster (measured: 124 ms -> 15 ms per
# 512 MB). PyTorch reads this once, at its first allocation, so it only helps when hf_moe_mt is
# imported before torch (the `hf-moe-mt` command, our scripts). Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from .configuration_moe_mt import MoEMTConfig  # noqa: E402
from .modeling_moe_mt import (  # noqa: E402
    MoEMTForConditionalGeneration,
    MoEMTModel,
    MoEMTPreTrainedModel,
    dropless_routing,
)
from .moe import RouterInfo, SparseMoE  # noqa: E402
from .pipeline_moe_mt import MoEMTTranslationPipeline, register_translation_pipeline  # noqa: E402
from .tokenization_moe_mt import MoEMTTokenizer  # noqa: E402

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
