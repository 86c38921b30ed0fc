"""The MoE-MT encoder-decoder as a transformers model (single device), in reading order:
losses → embeddings → attention → dense FFN → sparse FFN (`hf_moe_mt.moe.SparseMoE`) → encoder/decoder
layers → stacks → `MoEMTModel` → `MoEMTForConditionalGeneration` (loss assembly, dropless `generate`).

Travels as Hub remote code: imports only torch, transformers and flat siblings (`.configuration_moe_mt`,
`.generation_moe_mt`, `.moe`, `.moe_kernels`); never data/, training/, tools/, parallel.py or backends/. Expert
parallelism and CPU speed backends are applied from outside; every projection is a plain `nn.Linear`.
Legend: B batch, S source length, L target length, D d_model, F ffn size, E experts, V vocabulary.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, ModelOutput, Seq2SeqMoEModelOutput, Seq2SeqMoEOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_moe_mt import MoEMTConfig
from .generation_moe_mt import ngram_repeat_limit
from .moe import GroupedExperts, RouterInfo, SparseMoE, TopKRouter
from .moe_kernels import activation_forward

# ----------------------------------------------------------------------------------------------------------------
# Losses and label helpers (pure functions)
# ----------------------------------------------------------------------------------------------------------------


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """[B, L] labels → decoder inputs: start token, then labels[:, :-1]; -100 becomes padding."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def translation_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, num_items_in_batch=None
) -> torch.Tensor:
    """Label-smoothed token cross-entropy in fp32, ignoring -100.

    Mean over this batch's target tokens, or sum / `num_items_in_batch` when the Trainer passes it (the token
    count of the whole accumulated, all-device batch), which keeps gradient accumulation exact.
    """
    logits = logits.float().reshape(-1, logits.shape[-1])  # [B·L, V]
    labels = labels.to(logits.device).reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss


def mean_router_losses(router_info: tuple[RouterInfo, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(aux, z) averaged over MoE layers — fairseq's 'average': the coefficient does not depend on depth."""
    if not router_info:
        return None, None
    device = router_info[0].aux_loss.device
    aux = torch.stack([info.aux_loss.to(device) for info in router_info]).mean()
    z = torch.stack([info.z_loss.to(device) for info in router_info]).mean()
    return aux, z


def router_loss_weight(labels: torch.Tensor, num_items_in_batch) -> torch.Tensor | float:
    """This batch's share of the tokens the Trainer normalises by.

    With `num_items_in_batch` the Trainer sums micro-batch losses instead of averaging them, so an unweighted
    router loss would be multiplied by the accumulation steps; weighting by the token share keeps it a mean.
    """
    if num_items_in_batch is None:
        return 1.0
    num_tokens = (labels != -100).sum().to(torch.float32)
    return num_tokens / torch.as_tensor(num_items_in_batch, device=num_tokens.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------


class MoEMTScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by `embed_scale` (√D when `config.scale_embedding`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


def build_token_embedding(config: MoEMTConfig) -> MoEMTScaledWordEmbedding:
    embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
    return MoEMTScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)


def sinusoidal_table(num_positions: int, embedding_dim: int, offset: int) -> torch.Tensor:
    """Rows offset … offset+num_positions-1 of fairseq's/M2M100's table: [sin(p·f), cos(p·f)], f geometric."""
    half_dim = embedding_dim // 2
    freq = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -(math.log(10000) / (half_dim - 1)))
    angles = torch.arange(offset, offset + num_positions, dtype=torch.float32).unsqueeze(1) * freq.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


class MoEMTSinusoidalPositionalEmbedding(nn.Module):
    """Fixed sinusoidal positions: position p gets fairseq's row p + padding_idx + 1, exactly what M2M100/NLLB
    use for the p-th real token, so dense M2M100/NLLB checkpoints keep their positions here."""

    def __init__(self, num_positions: int, embedding_dim: int, padding_idx: int):
        super().__init__()
        self.num_positions, self.embedding_dim, self.offset = num_positions, embedding_dim, padding_idx + 1
        self.register_buffer("weight", sinusoidal_table(num_positions, embedding_dim, self.offset), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(position_ids, self.weight)  # [B, S, D] fp32; the caller casts to the model dtype


def make_position_ids(attention_mask: torch.Tensor | None, seq_length: int, past_length, device) -> torch.Tensor:
    """0-based positions of the current `seq_length` tokens ([1 or B, S]).

    Padding does not advance the count, so a sentence gets the same positions alone and in a left- or
    right-padded batch; the mask may cover past + current tokens (cached decoding). `past_length` is an int, or a
    0-d tensor for a static cache (which counts on the device, so a compiled decoding step needs no host sync).
    """
    if attention_mask is None:
        return (torch.arange(seq_length, device=device) + past_length).unsqueeze(0)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions[:, -seq_length:].clamp_min(0)


def check_positions(num_positions: int, seq_length: int, past_length) -> None:
    if torch.is_tensor(past_length) and is_torchdynamo_compiling():
        return  # a static cache's device-side length: branching on it would break the compiled graph
    if past_length + seq_length > num_positions:
        raise ValueError(
            f"a sequence of {past_length + seq_length} tokens exceeds max_position_embeddings={num_positions}; "
            "truncate the input or build the model with a larger max_position_embeddings"
        )


def build_positional_embedding(config: MoEMTConfig) -> nn.Module:
    if config.position_embedding_type == "learned":
        return nn.Embedding(config.max_position_embeddings, config.d_model)
    return MoEMTSinusoidalPositionalEmbedding(config.max_position_embeddings, config.d_model, config.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs: Unpack[TransformersKwargs]
):
    """Reference attention: [B, H, S, Dh] inputs → ([B, S, H, Dh], [B, H, S, S_k] weights)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MoEMTAttention(nn.Module):
    """Multi-head self- or cross-attention (M2M100's), through `ALL_ATTENTION_FUNCTIONS` (SDPA by default).

    forward(hidden_states [B, S, D], key_value_states [B, S_k, D] for cross-attention) → ([B, S, D], weights).
    Cross-attention keys/values are computed once per generation and reused from the `EncoderDecoderCache`.
    """

    def __init__(self, config: MoEMTConfig, num_heads: int, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.config, self.num_heads, self.is_causal, self.layer_idx = config, num_heads, is_causal, layer_idx
        self.head_dim = config.d_model // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(
        self, hidden_states, key_value_states=None, cache: Cache | None = None, attention_mask=None,
        **kwargs: Unpack[FlashAttentionKwargs],
    ):
        """1. queries  2. keys/values: fresh, or cached cross-attention ones  3. attention  4. output projection."""
        is_cross_attention = key_value_states is not None
        input_shape = hidden_states.shape[:-1]
        # 1.
        query_states = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        # 2.
        layer_cache, is_updated = cache, False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            layer_cache = cache.cross_attention_cache if is_cross_attention else cache.self_attention_cache
        current_states = key_value_states if is_cross_attention else hidden_states
        if is_cross_attention and cache is not None and is_updated:
            key_states = layer_cache.layers[self.layer_idx].keys
            value_states = layer_cache.layers[self.layer_idx].values
        else:
            kv_shape = (*current_states.shape[:-1], -1, self.head_dim)
            key_states = self.k_proj(current_states).view(kv_shape).transpose(1, 2)
            value_states = self.v_proj(current_states).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key_states, value_states = layer_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
                if is_cross_attention and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        # 3.
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=self.dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        # 4.
        attn_output = self.out_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward networks: dense, and sparse (SparseMoE)
# ----------------------------------------------------------------------------------------------------------------


class MoEMTDenseFFN(nn.Module):
    """`mlp` of a dense layer: [.., D] → up_proj → activation → dropout → down_proj → [.., D].

    Same names and weight layout as one expert (`up_proj.weight` [F, D] == `experts.up_proj[e]`), and the same
    activation code, so a dense layer and a one-expert MoE layer compute the same function.
    """

    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.activation = activation
        self.up_proj = nn.Linear(d_model, ffn_dim)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.down_proj = nn.Linear(ffn_dim, d_model)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = activation_forward(self.activation, self.up_proj(hidden_states))
        hidden_states = self.activation_dropout(hidden_states)
        return self.down_proj(hidden_states)


def build_sparse_mlp(config: MoEMTConfig) -> SparseMoE:
    """`mlp` of a MoE layer: all `num_experts` experts (expert parallelism slices them later, from outside)."""
    return SparseMoE(
        hidden_size=config.d_model,
        ffn_dim=config.expert_ffn_dim,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
        min_capacity=config.min_capacity,
        use_rts=config.router_use_rts,
        drop_tokens=config.router_drop_tokens,
        jitter_noise=config.router_jitter_noise,
        activation=config.activation_function,
        experts_kernel=config.experts_kernel,
    )


@contextmanager
def dropless_routing(model: nn.Module) -> Iterator[None]:
    """Run every SparseMoE in `model` without capacity inside the block, then restore each layer's setting.

    Capacity makes a token's output depend on the other tokens of its batch; without it a sentence translates
    the same alone and inside any padded batch.
    """
    layers = [module for module in model.modules() if isinstance(module, SparseMoE)]
    saved = [layer.drop_tokens for layer in layers]
    try:
        for layer in layers:
            layer.drop_tokens = False
        yield
    finally:
        for layer, drop_tokens in zip(layers, saved):
            layer.drop_tokens = drop_tokens


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder layers (pre-LayerNorm)
# ----------------------------------------------------------------------------------------------------------------


class MoEMTLayer(GradientCheckpointingLayer):
    """What encoder and decoder layers share: the residual FFN sublayer x + FFN(LN(x)), dense or sparse by
    `config.is_sparse_layer(stack, layer_idx)`."""

    def __init__(self, config: MoEMTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.moe_eom = layer_idx, config.moe_eom
        self.residual_dropout = nn.Dropout(config.dropout)

    def _init_feed_forward(self, config: MoEMTConfig, stack: str) -> None:
        """Called last by subclasses, so parameters are listed in forward order (attention, then FFN)."""
        self.is_sparse = config.is_sparse_layer(stack, self.layer_idx)
        ffn_dim = config.encoder_ffn_dim if stack == "encoder" else config.decoder_ffn_dim
        self.mlp_layer_norm = nn.LayerNorm(config.d_model)
        if self.is_sparse:
            self.mlp = build_sparse_mlp(config)
        else:
            self.mlp = MoEMTDenseFFN(config.d_model, ffn_dim, config.activation_function, config.activation_dropout)

    def _residual(self, residual: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return residual + self.residual_dropout(hidden_states)

    def _feed_forward(self, hidden_states, padding_mask):
        """→ (hidden_states, aux_loss, z_loss, RouterInfo); the last three are None in a dense layer.

        The router losses are also returned on their own, next to the RouterInfo that holds them: reentrant
        gradient checkpointing connects only the tensors a checkpointed layer returns directly to the graph, so
        the losses inside RouterInfo would come back without their gradient.
        """
        normed = self.mlp_layer_norm(hidden_states)
        if not self.is_sparse:
            return self._residual(hidden_states, self.mlp(normed)), None, None, None
        out, info = self.mlp(normed, padding_mask=padding_mask)
        if self.training and self.moe_eom > 0:  # expert output masking: whole tokens, not features
            out = out.masked_fill(torch.rand(out.shape[:-1] + (1,), device=out.device) < self.moe_eom, 0.0)
        return self._residual(hidden_states, out), info.aux_loss, info.z_loss, info


class MoEMTEncoderLayer(MoEMTLayer):
    """x + SelfAttn(LN(x)), then x + FFN(LN(x)). forward → ([B, S, D], aux_loss, z_loss, RouterInfo), see
    `MoEMTLayer._feed_forward`."""

    def __init__(self, config: MoEMTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn = MoEMTAttention(config, config.encoder_attention_heads)
        self._init_feed_forward(config, "encoder")

    def forward(self, hidden_states, attention_mask=None, padding_mask=None, **kwargs: Unpack[TransformersKwargs]):
        """`attention_mask`: the 4-D (or None) mask for attention; `padding_mask` [B, S]: 1 = real token (MoE)."""
        attn_out, _ = self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = self._residual(hidden_states, attn_out)
        return self._feed_forward(hidden_states, padding_mask)


class MoEMTDecoderLayer(MoEMTLayer):
    """x + CausalSelfAttn(LN(x)), x + CrossAttn(LN(x), encoder), x + FFN(LN(x)).
    forward → ([B, L, D], aux_loss, z_loss, RouterInfo), see `MoEMTLayer._feed_forward`."""

    def __init__(self, config: MoEMTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        heads = config.decoder_attention_heads
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.self_attn = MoEMTAttention(config, heads, is_causal=True, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.d_model)
        self.encoder_attn = MoEMTAttention(config, heads, layer_idx=layer_idx)
        self._init_feed_forward(config, "decoder")

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        padding_mask=None,
        cache: Cache | None = None,
        use_cache: bool | None = True,
        **kwargs: Unpack[TransformersKwargs],
    ):
        attn_out, _ = self.self_attn(
            self.self_attn_layer_norm(hidden_states), cache=cache, attention_mask=attention_mask, **kwargs
        )
        hidden_states = self._residual(hidden_states, attn_out)
        if encoder_hidden_states is not None:
            attn_out, _ = self.encoder_attn(
                self.encoder_attn_layer_norm(hidden_states), key_value_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask, cache=cache, **kwargs,
            )
            hidden_states = self._residual(hidden_states, attn_out)
        return self._feed_forward(hidden_states, padding_mask)


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MoEMTEncoderOutput(BaseModelOutput):
    """Encoder output; with `output_router_logits=True` also `router_info` (one RouterInfo per MoE layer) and
    `router_logits` (their [B, S, E] logits)."""

    router_logits: tuple[torch.Tensor, ...] | None = None
    router_info: tuple[RouterInfo, ...] | None = None


@dataclass
class MoEMTDecoderOutput(ModelOutput):
    """Decoder output: states, cache, and per-MoE-layer router info/logits as in `MoEMTEncoderOutput`."""

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    router_info: tuple[RouterInfo, ...] | None = None


@dataclass
class MoEMTModelOutput(Seq2SeqMoEModelOutput):
    """`Seq2SeqMoEModelOutput` plus the router losses (see `MoEMTSeq2SeqLMOutput`)."""

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    encoder_aux_loss: torch.Tensor | None = None
    decoder_aux_loss: torch.Tensor | None = None
    encoder_z_loss: torch.Tensor | None = None
    decoder_z_loss: torch.Tensor | None = None
    encoder_router_info: tuple[RouterInfo, ...] | None = None
    decoder_router_info: tuple[RouterInfo, ...] | None = None


@dataclass
class MoEMTSeq2SeqLMOutput(Seq2SeqMoEOutput):
    """`Seq2SeqMoEOutput` of `MoEMTForConditionalGeneration`.

    - `loss`: label-smoothed cross-entropy + `router_aux_loss_coef`·`aux_loss` + `router_z_loss_coef`·`z_loss`
      (when `labels` are given).
    - `aux_loss`, `z_loss`: load-balancing and z losses averaged over every MoE layer of encoder and decoder
      (returned with labels or `output_router_logits=True`, None otherwise); `encoder_aux_loss`/
      `decoder_aux_loss`/`encoder_z_loss`/`decoder_z_loss`: the same averages per stack (None for a stack
      without MoE layers).
    - With `output_router_logits=True`: `encoder_router_logits`/`decoder_router_logits` (one [B, S, E] fp32
      tensor per MoE layer, zeros at padding) and `encoder_router_info`/`decoder_router_info`: one
      `hf_moe_mt.moe.RouterInfo` per MoE layer in layer order, whose `tokens_per_expert` [E] and
      `dropped_fraction` give per-layer expert load and capacity drops for logging.
    """

    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    encoder_router_info: tuple[RouterInfo, ...] | None = None
    decoder_router_info: tuple[RouterInfo, ...] | None = None


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model base, encoder and decoder stacks
# ----------------------------------------------------------------------------------------------------------------


class MoEMTPreTrainedModel(PreTrainedModel):
    config: MoEMTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEMTEncoderLayer", "MoEMTDecoderLayer"]
    _supports_sdpa = True
    # attention goes through `ALL_ATTENTION_FUNCTIONS` with the standard [B, H, S, Dh] call, so registered backends
    # (kernels hub, custom `AttentionInterface` functions) plug in
    _supports_attention_backend = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # Decoding steps compile without graph breaks: generation routes dropless (`router_dropless_generation`, the
    # default), whose shapes depend only on the batch, and the experts run as one opaque operator (moe.py).
    _can_compile_fullgraph = True
    # The router is computed in fp32 anyway; keeping its weight fp32 under bf16 keeps top-k choices stable.
    _keep_in_fp32_modules_strict = ["mlp.gate"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding (padding row zero) / LayerNorm
        std = self.config.init_std
        if isinstance(module, MoEMTScaledWordEmbedding) and self.config.embedding_init_std is not None:
            init.normal_(module.weight, mean=0.0, std=self.config.embedding_init_std)
            init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, MoEMTSinusoidalPositionalEmbedding):
            init.copy_(module.weight, sinusoidal_table(module.num_positions, module.embedding_dim, module.offset))
        # each module initialises its own parameters: `from_pretrained` skips a module whose own parameters were
        # all loaded, so a parent (SparseMoE) initialising its children's would leave missing ones uninitialised
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GroupedExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)


def _collect_layer_output(layer_output: tuple, router_info: list[RouterInfo]) -> torch.Tensor:
    """A layer's (hidden_states, aux_loss, z_loss, RouterInfo) → hidden_states. A MoE layer's RouterInfo is kept
    with the losses the layer returned on their own (the ones that keep their gradient under reentrant checkpointing)."""
    hidden_states, aux_loss, z_loss, info = layer_output
    if info is not None:
        router_info.append(replace(info, aux_loss=aux_loss, z_loss=z_loss))
    return hidden_states


def _router_outputs(router_info: list[RouterInfo], output_router_logits: bool) -> dict:
    """Router fields of a stack's output: only on request, so positional consumers see the same tuple as a dense
    model's (`to_tuple()` drops None fields)."""
    if not output_router_logits:
        return {}
    return {"router_info": tuple(router_info), "router_logits": tuple(info.router_logits for info in router_info)}


class MoEMTEncoder(MoEMTPreTrainedModel):
    """Token + position embeddings → `encoder_layers` pre-LN layers → final LayerNorm.

    forward(input_ids [B, S], attention_mask [B, S]) → MoEMTEncoderOutput(last_hidden_state [B, S, D], ...).
    The attention mask also tells the MoE layers which tokens are padding (never routed).
    """

    _can_record_outputs = {"hidden_states": MoEMTEncoderLayer, "attentions": MoEMTAttention}

    def __init__(self, config: MoEMTConfig):
        super().__init__(config)
        self.embed_tokens = build_token_embedding(config)
        self.embed_positions = build_positional_embedding(config)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MoEMTEncoderLayer(config, i) for i in range(config.encoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self, input_ids=None, attention_mask=None, inputs_embeds=None, output_router_logits=None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoEMTEncoderOutput:
        """1. embed tokens + positions  2. masks  3. layers (collect MoE router info)  4. final LayerNorm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds to the encoder")
        # 1.
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, S, D]
        seq_length = inputs_embeds.shape[1]
        check_positions(self.config.max_position_embeddings, seq_length, 0)
        positions = self.embed_positions(make_position_ids(attention_mask, seq_length, 0, inputs_embeds.device))
        hidden_states = inputs_embeds + positions.to(inputs_embeds.dtype)
        hidden_states = self.embedding_dropout(hidden_states)
        # 2.
        attn_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
        )
        # 3.
        router_info = []
        for layer in self.layers:
            hidden_states = _collect_layer_output(layer(hidden_states, attn_mask, attention_mask, **kwargs), router_info)
        # 4.
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return MoEMTEncoderOutput(
            last_hidden_state=self.layer_norm(hidden_states), **_router_outputs(router_info, output_router_logits)
        )


class MoEMTDecoder(MoEMTPreTrainedModel):
    """Causal pre-LN decoder with cross-attention; forward(input_ids [B, L], encoder_hidden_states [B, S, D])
    → MoEMTDecoderOutput(last_hidden_state [B, L, D], cache, ...).

    Its MoE layers treat positions where `attention_mask` (the decoder mask) is 0 as padding; without a mask
    every position is a real token (generation).
    """

    _can_record_outputs = {
        "hidden_states": MoEMTDecoderLayer,
        "attentions": OutputRecorder(MoEMTAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(MoEMTAttention, index=1, layer_name="encoder_attn"),
    }

    def __init__(self, config: MoEMTConfig):
        super().__init__(config)
        self.embed_tokens = build_token_embedding(config)
        self.embed_positions = build_positional_embedding(config)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([MoEMTDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoEMTDecoderOutput:
        """1. embed tokens + positions (after the cached ones)  2. masks  3. layers  4. final LayerNorm."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of decoder_input_ids or decoder_inputs_embeds to the decoder")
        # 1.
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, L, D]
        if use_cache and cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
        batch_size, seq_length = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        check_positions(self.config.max_position_embeddings, seq_length, past_length)
        # [B, past + L] of 1/0, or a 4-D mask `generate` built ahead of a compiled step (static cache): then every
        # current token is real and follows the cached ones
        token_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        position_ids = make_position_ids(token_mask, seq_length, past_length, inputs_embeds.device)
        hidden_states = inputs_embeds + self.embed_positions(position_ids).to(inputs_embeds.dtype)
        hidden_states = self.embedding_dropout(hidden_states)
        # 2. The MoE padding mask covers only the current tokens; the attention mask covers past + current.
        padding_mask = None if token_mask is None else token_mask[:, -seq_length:]
        if attention_mask is None and not is_torchdynamo_compiling():
            attention_mask = torch.ones(batch_size, past_length + seq_length, device=inputs_embeds.device)
        self_attn_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=self_attn_cache
        )
        encoder_attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        # 3. encoder_hidden_states and padding_mask are positional: reentrant gradient checkpointing needs that.
        router_info = []
        for layer in self.layers:
            layer_output = layer(
                hidden_states, causal_mask, encoder_hidden_states, encoder_attention_mask, padding_mask,
                cache=cache, use_cache=use_cache, **kwargs,
            )
            hidden_states = _collect_layer_output(layer_output, router_info)
        # 4.
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return MoEMTDecoderOutput(
            last_hidden_state=self.layer_norm(hidden_states), cache=cache,
            **_router_outputs(router_info, output_router_logits),
        )


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


# router outputs beyond the losses: returned only with `output_router_logits` (labels ask for the losses alone)
ROUTER_DETAIL_FIELDS = ("encoder_router_logits", "decoder_router_logits", "encoder_router_info", "decoder_router_info")


def _stack_router_losses(prefix: str, router_info) -> dict:
    aux, z = mean_router_losses(router_info or ())
    return {f"{prefix}_aux_loss": aux, f"{prefix}_z_loss": z}


class MoEMTModel(MoEMTPreTrainedModel):
    """Shared token embedding + encoder + decoder; returns decoder states (and, on request, the router outputs).

    forward(input_ids [B, S], attention_mask [B, S], decoder_input_ids [B, L], ...) → MoEMTModelOutput with
    last_hidden_state [B, L, D]; with `output_router_logits=True` also `aux_loss`/`z_loss` (means over all MoE
    layers), per-stack means, router logits and RouterInfo per MoE layer.

    Encoder and decoder own their embedding modules (the layout of M2M100/NLLB-MoE); `_tied_weights_keys` ties
    their weights to `shared.weight` when `config.tie_word_embeddings`, so a checkpoint holding any one of the
    three fills all of them, and `from_pretrained` reports and initialises `shared.weight` when none is there.
    """

    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }

    def __init__(self, config: MoEMTConfig):
        super().__init__(config)
        self.shared = build_token_embedding(config)
        self.encoder = MoEMTEncoder(config)
        self.decoder = MoEMTDecoder(config)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """Encoder and decoder embeddings stay tied to `shared` whatever `tie_word_embeddings` says: here that flag
        unties only the LM head. (transformers' default reading unties every embedding, which would leave `shared`
        unused and make checkpoints saved with tie_word_embeddings=False miss the encoder/decoder tables.)"""
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        return dict(self._tied_weights_keys)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoEMTModelOutput:
        """1. encoder (skipped when `encoder_outputs` are given, as in generation)  2. decoder  3. router outputs
        (on request)."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # 1.
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                output_router_logits=output_router_logits, **kwargs,
            )
        elif not isinstance(encoder_outputs, ModelOutput):
            encoder_outputs = MoEMTEncoderOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        # 2.
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state, encoder_attention_mask=attention_mask,
            cache=cache, inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
            output_router_logits=output_router_logits, **kwargs,
        )
        # 3.
        router_outputs = {}
        if output_router_logits:
            encoder_info = encoder_outputs.get("router_info") or ()
            decoder_info = decoder_outputs.router_info or ()
            aux_loss, z_loss = mean_router_losses(encoder_info + decoder_info)
            router_outputs = dict(
                encoder_router_logits=encoder_outputs.get("router_logits"),
                decoder_router_logits=decoder_outputs.router_logits,
                aux_loss=aux_loss,
                z_loss=z_loss,
                **_stack_router_losses("encoder", encoder_info),
                **_stack_router_losses("decoder", decoder_info),
                encoder_router_info=encoder_info,
                decoder_router_info=decoder_info,
            )
        return MoEMTModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            **router_outputs,
        )


class MoEMTForConditionalGeneration(MoEMTPreTrainedModel, GenerationMixin):
    """MoEMTModel + LM head (tied to the shared embedding when `tie_word_embeddings`); owns its whole loss.

    forward(..., labels [B, L]) → MoEMTSeq2SeqLMOutput(loss, logits [B, L, V], aux_loss, z_loss, ...).
    `generate` runs the MoE layers dropless when `config.router_dropless_generation` (the default).
    """

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}

    def __init__(self, config: MoEMTConfig):
        super().__init__(config)
        self.model = MoEMTModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Used by `DataCollatorForSeq2Seq` to build `decoder_input_ids` in the data pipeline."""
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @staticmethod
    def _reorder_cache(cache: Cache, beam_idx: torch.Tensor) -> Cache:
        """Beam search reorders only the self-attention cache. Beam indices never leave a sentence's group
        of beams, and every beam of a sentence attends over the same encoder rows, so a row's own
        cross-attention keys/values are what a reorder would copy in (and what generation without a cache
        computes); skipping it saves 2 copies of [B·beams, heads, source length, head dim] per layer and step.
        A static cache is reordered in place: compiled decoding steps (CUDA graphs) hold its tensors' addresses."""
        self_attention = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        if not self_attention.is_compileable:
            self_attention.reorder_cache(beam_idx)
            return cache
        for layer in self_attention.layers:
            if layer.is_initialized:
                layer.keys.copy_(layer.keys.index_select(0, beam_idx.to(layer.keys.device)))
                layer.values.copy_(layer.values.index_select(0, beam_idx.to(layer.values.device)))
        return cache

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoEMTSeq2SeqLMOutput:
        """1. decoder inputs from labels  2. model + LM head  3. loss = CE + coef·aux + coef·z (with labels).

        Labels ask the model for its router losses (they are part of the loss) and the output then carries
        `aux_loss`/`z_loss`; router logits and RouterInfo come only with `output_router_logits`.
        `num_items_in_batch` (passed by the Trainer) normalises the CE over the whole accumulated batch and
        weights the router losses by this batch's token share (see `router_loss_weight`).
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        # 1.
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        # 2.
        outputs = self.model(
            input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, encoder_outputs=encoder_outputs, cache=cache,
            inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache,
            output_router_logits=output_router_logits or labels is not None, **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)  # [B, L, V]
        # 3.
        loss = None
        if labels is not None:
            loss = translation_loss(logits, labels, self.config.label_smoothing, num_items_in_batch)
            if outputs.aux_loss is not None:
                router_loss = (self.config.router_aux_loss_coef * outputs.aux_loss
                               + self.config.router_z_loss_coef * outputs.z_loss)
                loss = loss + router_loss_weight(labels, num_items_in_batch) * router_loss.to(loss.device)
        skipped = {"last_hidden_state"} | (set() if output_router_logits else set(ROUTER_DETAIL_FIELDS))
        model_fields = {key: value for key, value in outputs.items() if key not in skipped}
        return MoEMTSeq2SeqLMOutput(loss=loss, logits=logits, **model_fields)

    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        """`GenerationMixin.generate`, with every MoE layer dropless when `config.router_dropless_generation`, and
        the n-gram repeat limit (`max_ngram_repeats`, `ngram_repeat_size`: generation_moe_mt.py) added to the
        logits processors when the call or the generation config asks for it."""
        limit = ngram_repeat_limit(kwargs, *(c for c in (generation_config, self.generation_config) if c is not None))
        if limit is not None:
            logits_processor = LogitsProcessorList([*(logits_processor or []), limit])
        with dropless_routing(self) if self.config.router_dropless_generation else nullcontext():
            return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                    **kwargs)


MoEMTModel.register_for_auto_class("AutoModel")
MoEMTForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "MoEMTDenseFFN",
    "MoEMTForConditionalGeneration",
    "MoEMTModel",
    "MoEMTPreTrainedModel",
    "MoEMTSeq2SeqLMOutput",
    "dropless_routing",
    "shift_tokens_right",
]
