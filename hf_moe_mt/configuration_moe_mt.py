"""MoEMTConfig: sizes, MoE placement (one rule), routing, losses and the expert-parallel size of a model.

Travels with the Hub's remote code: imports only transformers and flat siblings (never data/, training/,
tools/, parallel.py). Every invalid value or combination fails at construction with a one-line ValueError.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .moe_kernels import ACTIVATIONS, KERNELS

STACKS = ("encoder", "decoder")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")


class MoEMTConfig(PreTrainedConfig):
    r"""Configuration of a pre-LayerNorm sparse-MoE encoder-decoder for multilingual translation.

    Field names follow transformers (M2M100 / NLLB-MoE / Switch). The MoE-specific ones:

    - `num_experts`, `num_experts_per_tok` (1 = the paper's top-1, or 2), `expert_ffn_dim`.
    - `encoder_sparse_step`, `decoder_sparse_step`: MoE in every `step`-th layer, counting from 1: with
      step 2 (the paper's placement) the 0-based layers 1, 3, 5, … are sparse and 0, 2, 4, … are dense,
      so every stack starts with a dense layer (the NLLB-MoE / fairseq convention). 0 = no MoE layers.
      `is_sparse_layer(stack, layer_idx)` is the only place that rule lives.
    - `capacity_factor` (training) / `eval_capacity_factor` (eval forward), `min_capacity`, `router_use_rts`,
      `router_drop_tokens` (False = dropless everywhere), `router_jitter_noise`.
    - `moe_eom`: expert output masking (NLLB-MoE's `moe_eom`, Elbayad et al. 2022): in training, each token's
      MoE output is zeroed with this probability (the token keeps its residual, as an overflowed token does), a
      regulariser against experts over-fitting small data. 0 = off.
    - `router_dropless_generation`: `generate` runs every MoE layer dropless, so a sentence translates the
      same alone and inside any batch (capacity would make results depend on the batch).
    - `router_aux_loss_coef`, `router_z_loss_coef`: the coefficients of the load-balancing and z losses,
      each averaged over all MoE layers of encoder and decoder (so the coefficient does not depend on depth).
    - `label_smoothing`: applied by the model itself, so a stock `Seq2SeqTrainer` (with its own
      `label_smoothing_factor=0`) keeps the aux loss.
    - `expert_parallel_size`: only validated here (`num_experts % expert_parallel_size == 0`); the model is
      always built with all experts, parallelism is applied from outside.
    - `position_embedding_type`: "sinusoidal" (M2M100's table, no parameters) or "learned".
    - `output_router_logits`: the forward's default for returning router logits, RouterInfo and the router losses
      (labels alone add only the losses, which are part of the loss).
    - `tie_word_embeddings`: ties the LM head to the shared token table; encoder and decoder share it always.
    - `experts_kernel`: which kernel computes the experts, `hf_moe_mt.moe_kernels.KERNELS`: "auto" (a fixed rule:
      grouped_mm on CUDA, padded bmm or per-expert loop on CPU), "grouped_mm", "loop" or "bmm". Not named
      `experts_implementation`: transformers reserves that for its own experts interface. Speed backends
      (`hf_moe_mt.backends`) are applied to a loaded model from outside and never saved here.
    - `activation_dropout` applies inside dense FFNs only; the experts of `hf_moe_mt.moe.SparseMoE` have none.
    - `embedding_init_std`: std of the token embedding at initialisation (None = `init_std`, as M2M100). With
      `scale_embedding` the model reads embedding·√d_model, so `d_model**-0.5` (fairseq's transformer) makes token
      vectors unit-scale, as large as the sinusoidal positions; 0.02 makes them √d·0.02 (0.32 at d_model=256),
      and small models then take longer to use token identity.
    """

    model_type = "moe_mt"
    keys_to_ignore_at_inference = [
        "cache", "aux_loss", "z_loss", "encoder_aux_loss", "decoder_aux_loss", "encoder_z_loss", "decoder_z_loss",
        "encoder_router_logits", "decoder_router_logits", "encoder_router_info", "decoder_router_info",
    ]
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
        "num_local_experts": "num_experts",
    }

    # sizes
    vocab_size: int = 32000
    d_model: int = 512
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    max_position_embeddings: int = 1024
    position_embedding_type: str = "sinusoidal"
    activation_function: str = "relu"
    scale_embedding: bool = True
    # MoE placement and routing
    num_experts: int = 16
    num_experts_per_tok: int = 1
    expert_ffn_dim: int = 2048
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    router_use_rts: bool = True
    router_drop_tokens: bool = True
    router_jitter_noise: float = 0.0
    moe_eom: float = 0.0
    router_dropless_generation: bool = True
    experts_kernel: str = "auto"
    expert_parallel_size: int = 1
    output_router_logits: bool = False
    # losses
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    label_smoothing: float = 0.0
    # regularisation and init
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    embedding_init_std: float | None = None
    # generation and special tokens
    use_cache: bool = True
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = 2

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for ok, message in self._checks():
            if not ok:
                raise ValueError(f"MoEMTConfig: {message}")

    def is_sparse_layer(self, stack: str, layer_idx: int) -> bool:
        """True when layer `layer_idx` (0-based) of `stack` ("encoder"/"decoder") has a MoE FFN."""
        if stack not in STACKS:
            raise ValueError(f"stack={stack!r} is not one of {STACKS}")
        step = self.encoder_sparse_step if stack == "encoder" else self.decoder_sparse_step
        return step > 0 and (layer_idx + 1) % step == 0

    def sparse_layers(self, stack: str) -> list[int]:
        """The 0-based indices of the MoE layers of `stack`."""
        num_layers = self.encoder_layers if stack == "encoder" else self.decoder_layers
        return [i for i in range(num_layers) if self.is_sparse_layer(stack, i)]

    def _checks(self):
        """(condition, one-line message naming the problem and the fix) pairs, in field order."""
        checks = [(_positive_int(getattr(self, name)), f"{name}={getattr(self, name)!r} must be a positive integer")
                  for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                               "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "expert_ffn_dim",
                               "max_position_embeddings", "num_experts", "expert_parallel_size")]
        if not all(ok for ok, _ in checks):
            return checks
        checks += [
            (self.d_model % self.encoder_attention_heads == 0,
             f"d_model={self.d_model} is not divisible by encoder_attention_heads={self.encoder_attention_heads}; "
             "choose heads that divide d_model"),
            (self.d_model % self.decoder_attention_heads == 0,
             f"d_model={self.d_model} is not divisible by decoder_attention_heads={self.decoder_attention_heads}; "
             "choose heads that divide d_model"),
            (self.position_embedding_type in POSITION_EMBEDDING_TYPES,
             f"position_embedding_type={self.position_embedding_type!r} is not one of {POSITION_EMBEDDING_TYPES}"),
            (self.activation_function in ACTIVATIONS,
             f"activation_function={self.activation_function!r} is not supported; use one of {list(ACTIVATIONS)}"),
            (self.experts_kernel in KERNELS,
             f"experts_kernel={self.experts_kernel!r} is not one of {KERNELS}"),
            (self.num_experts_per_tok in (1, 2),
             f"num_experts_per_tok={self.num_experts_per_tok!r} is not supported; use 1 (the paper's top-1) or 2"),
            (self.num_experts >= self.num_experts_per_tok,
             f"num_experts={self.num_experts} must be >= num_experts_per_tok={self.num_experts_per_tok}"),
            (self.num_experts % self.expert_parallel_size == 0,
             f"num_experts={self.num_experts} is not divisible by expert_parallel_size={self.expert_parallel_size}; "
             "use an expert_parallel_size that divides num_experts"),
            (_non_negative_int(self.encoder_sparse_step), f"encoder_sparse_step={self.encoder_sparse_step!r} "
             "must be an integer >= 0 (0 = dense, 2 = MoE in every other layer)"),
            (_non_negative_int(self.decoder_sparse_step), f"decoder_sparse_step={self.decoder_sparse_step!r} "
             "must be an integer >= 0 (0 = dense, 2 = MoE in every other layer)"),
            (self.capacity_factor > 0, f"capacity_factor={self.capacity_factor} must be > 0 (1.0 = paper training)"),
            (self.eval_capacity_factor > 0,
             f"eval_capacity_factor={self.eval_capacity_factor} must be > 0 (2.0 = paper evaluation)"),
            (_non_negative_int(self.min_capacity), f"min_capacity={self.min_capacity!r} must be an integer >= 0"),
            (0 <= self.router_jitter_noise < 1, f"router_jitter_noise={self.router_jitter_noise} must be in [0, 1)"),
            (0 <= self.moe_eom < 1, f"moe_eom={self.moe_eom} must be in [0, 1) (0 = no expert output masking)"),
            (self.router_aux_loss_coef >= 0, f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0"),
            (self.router_z_loss_coef >= 0, f"router_z_loss_coef={self.router_z_loss_coef} must be >= 0"),
            (0 <= self.label_smoothing < 1, f"label_smoothing={self.label_smoothing} must be in [0, 1)"),
            (self.embedding_init_std is None or self.embedding_init_std > 0,
             f"embedding_init_std={self.embedding_init_std} must be positive (or null for init_std)"),
            (isinstance(self.pad_token_id, int), f"pad_token_id={self.pad_token_id!r} must be set (an integer id)"),
        ]
        checks += [(0 <= getattr(self, name) < 1, f"{name}={getattr(self, name)} must be in [0, 1)")
                   for name in ("dropout", "attention_dropout", "activation_dropout")]
        return checks


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


MoEMTConfig.register_for_auto_class()

__all__ = ["MoEMTConfig"]
