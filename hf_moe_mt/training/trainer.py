"""MoESeq2SeqTrainer: the stock Seq2SeqTrainer plus only what a sparse MoE model needs.

Owns: refusing `label_smoothing_factor` (the model smooths its own loss and keeps its router losses),
expert parallelism set up before the Trainer wraps the model (DeepSpeed ZeRO-1/2 through deepspeed_ep.py, or
accelerate/torch DDP with the experts kept out of DDP), on the DDP path the expert-gradient reduction and
clipping by the true global norm, MoE optimizer groups for DeepSpeed, ONE full HF model on every save,
checkpoints written under a temporary name and renamed (per-EP-rank optimizer files on the DDP path), and
router metrics in every training log. Imports deepspeed only when a DeepSpeed config is in use.

Expert-parallel run, either engine (world = ep × edp processes, every rank builds the full model first):

    model = MoEMTForConditionalGeneration.from_pretrained(path, expert_parallel_size=2)
    trainer = MoESeq2SeqTrainer(model=model, args=Seq2SeqTrainingArguments(..., deepspeed=None | ds_config), ...)
    trainer.train()            # checkpoint-N/ resumes at the same ep_size, and holds the full model
    trainer.save_model(path)   # collective: every rank calls it; one HF folder with every expert
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from ..configuration_moe_mt import MoEMTConfig
from ..parallel import (ExpertParallelGroups, clip_grad_norm_, create_expert_parallel_groups,
                        exclude_experts_from_ddp, gather_full_state_dict, global_grad_norm, parallelize_experts,
                        reduce_expert_gradients, slice_full_state_dict)
from .checkpoints import (check_checkpoint_complete, last_complete_checkpoint, load_checkpoint_state_dict,
                          load_full_state_into, load_optimizer_slice, publish_directory, remove_stale_staging,
                          save_optimizer_slice, staging_path)
from .metrics import RouterMetrics

SCHEDULER_NAME, TRAINER_STATE_NAME = "scheduler.pt", "trainer_state.json"


def check_label_smoothing(label_smoothing_factor: float) -> None:
    """The Trainer pops `labels` before the forward when it smooths itself: the model then returns no loss of
    its own and every MoE aux / z loss silently disappears."""
    if label_smoothing_factor > 0:
        raise ValueError(f"label_smoothing_factor={label_smoothing_factor} makes the Trainer drop the labels "
                         "and with them the MoE aux and z losses; set label_smoothing_factor=0 and the model's "
                         f"config.label_smoothing={label_smoothing_factor} instead")


def deepspeed_config_of(args) -> dict | str | None:
    """The DeepSpeed config of this run: `args.deepspeed`, or the one `accelerate launch` put in the plugin."""
    if args.deepspeed:
        return args.deepspeed
    plugin = getattr(args, "deepspeed_plugin", None)  # set by TrainingArguments only under accelerate + DeepSpeed
    return plugin.deepspeed_config if plugin is not None else None


def configured_expert_parallel_size(model) -> int:
    config = getattr(model, "config", None)
    return config.expert_parallel_size if isinstance(config, MoEMTConfig) else 1


def setup_expert_parallelism(model, args, expert_parallel_size: int | None) -> ExpertParallelGroups | None:
    """Slice the experts onto this rank before the Trainer wraps the model (collective call).

    1. ep from the argument, else `model.config.expert_parallel_size`  2. world % ep  3. DeepSpeed: the
    engine interop of deepspeed_ep.py; otherwise our all-to-all experts, left out of DDP.
    """
    ep = expert_parallel_size if expert_parallel_size is not None else configured_expert_parallel_size(model)
    if ep == 1:
        return None
    _ = args.device  # sets up torch.distributed (accelerate's PartialState) as the Trainer would
    if args.world_size % ep:
        raise ValueError(f"world size {args.world_size} is not divisible by expert_parallel_size={ep}; launch a "
                         f"multiple of {ep} processes (accelerate launch / torchrun / deepspeed) or choose an "
                         f"expert_parallel_size that divides {args.world_size}")
    deepspeed_config = deepspeed_config_of(args)
    if deepspeed_config is not None:
        from .deepspeed_ep import prepare_model_for_deepspeed

        return prepare_model_for_deepspeed(model, ep, deepspeed_config)
    groups = create_expert_parallel_groups(ep)
    parallelize_experts(model, groups)
    exclude_experts_from_ddp(model)
    return groups


class MoESeq2SeqTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` for MoE models; see the module docstring. Extra argument: `expert_parallel_size`
    (default: `model.config.expert_parallel_size`). `router_metrics` holds the routing statistics."""

    def __init__(self, model=None, args=None, *trainer_args, expert_parallel_size: int | None = None,
                 max_tokens: int | None = None, maxi_batch: int | None = None, **kwargs):
        if args is None:
            args = Seq2SeqTrainingArguments(output_dir="trainer_output")
        check_label_smoothing(args.label_smoothing_factor)
        if max_tokens is not None and maxi_batch is not None:
            raise ValueError("max_tokens and maxi_batch both set; choose token batches (max_tokens) or batches of "
                             "per_device_train_batch_size sentences sorted within pools (maxi_batch)")
        self.max_tokens, self.maxi_batch = max_tokens, maxi_batch
        self.expert_parallel_groups = setup_expert_parallelism(model, args, expert_parallel_size)
        super().__init__(model, args, *trainer_args, **kwargs)
        self.router_metrics = RouterMetrics(self.model)

    @property
    def ddp_expert_parallel(self) -> bool:
        """Expert parallel without DeepSpeed: gradient reduction and global clipping are ours."""
        return self.expert_parallel_groups is not None and not self.is_deepspeed_enabled

    @property
    def expert_parallel_size(self) -> int:
        return 1 if self.expert_parallel_groups is None else self.expert_parallel_groups.ep_size

    # ------------------------------------------------------------------ data

    def get_train_dataloader(self):
        """With `max_tokens`: batches of similar-length examples holding about `max_tokens` tokens per device
        (`hf_moe_mt.data.TokenBatchSampler`); `per_device_train_batch_size` is then unused. With `maxi_batch`:
        `per_device_train_batch_size` sentences per batch, sorted by length within pools of `maxi_batch` random
        batches (`MaxiBatchSampler`). accelerate shards the batches over processes, and the Trainer's
        `set_epoch` reaches the sampler."""
        if self.max_tokens is None and self.maxi_batch is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        from ..data.batching import length_batch_sampler

        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = length_batch_sampler(dataset, self.args.per_device_train_batch_size, max_tokens=self.max_tokens,
                                       maxi_batch=self.maxi_batch, seed=seed, drop_last=self.args.dataloader_drop_last)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------ optimizer and gradients

    def create_optimizer(self, model=None):
        """Under DeepSpeed + EP every expert param must sit in a 'moe' group, or ZeRO refuses the optimizer
        ("None of the param groups are marked as MoE"); the DDP path keeps the stock groups."""
        if self.optimizer is not None or not (self.is_deepspeed_enabled and self.expert_parallel_groups is not None):
            return super().create_optimizer(model)
        from .deepspeed_ep import moe_optimizer_param_groups

        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        param_groups = moe_optimizer_param_groups(self.model, self.args.weight_decay,
                                                  self.get_decay_parameter_names(self.model))
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Stock step; at the last micro-batch of an accumulation the expert grads (outside DDP) are reduced
        over the expert-data-parallel group, as DDP just did for the shared params."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.ddp_expert_parallel and self.accelerator.sync_gradients:
            reduce_expert_gradients(self.model, self.expert_parallel_groups)
        return loss

    def _clip_grad_norm(self, model):
        """The DDP clip would use this rank's expert grads only: clip by shared² + Σ_EP expert² instead."""
        if self.ddp_expert_parallel:
            self.accelerator.unscale_gradients()  # fp16: the loss scale off first (no-op otherwise), as accelerate does
            return clip_grad_norm_(self.model, self.args.max_grad_norm, self.expert_parallel_groups)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.ddp_expert_parallel and grad_norm is None:
            self.accelerator.unscale_gradients()
            grad_norm = global_grad_norm(self.model, self.expert_parallel_groups)
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **gen_kwargs):
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **self._generation_kwargs(gen_kwargs))

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test", **gen_kwargs):
        return super().predict(test_dataset, ignore_keys, metric_key_prefix, **self._generation_kwargs(gen_kwargs))

    def _generation_kwargs(self, gen_kwargs: dict) -> dict:
        """Under EP every decoding step is a collective (all-to-all): with `predict_with_generate` the ranks must
        keep stepping until all are done (`synced_gpus`), or the first to finish leaves the others hanging."""
        if self.expert_parallel_groups is not None:
            gen_kwargs.setdefault("synced_gpus", True)
        return gen_kwargs

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs (the ones with "loss") also carry the router metrics of the steps since the last one."""
        if "loss" in logs:
            logs = {**logs, **self.router_metrics.compute()}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """One HF folder with every expert (collective under EP: every rank calls it). A user call stages the
        folder and renames it into place; a checkpoint's call writes into the checkpoint's staging dir."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if _internal_call:
            return self._write_model(output_dir)
        staging = staging_path(output_dir)
        self._prepare_staging(staging)
        self._write_model(staging)
        self._publish(staging, output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _write_model(self, output_dir: str) -> None:
        if self.expert_parallel_groups is None:
            return super().save_model(output_dir, _internal_call=True)
        # The stock save would write rank 0's expert slice [E/ep, ...] as if it were the model.
        state = gather_full_state_dict(self.model, self.expert_parallel_groups)
        self._save(output_dir, state_dict=state)

    def _prepare_staging(self, staging: str) -> None:
        """An empty `staging` for every rank to write into (a crashed save may have left one behind)."""
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()

    def _publish(self, staging: str, final_dir: str) -> None:
        """Rename once every rank has written its files (rank-local files: DeepSpeed shards, RNG states)."""
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_directory(staging, final_dir)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint (model, optimizer, scheduler, RNG, trainer state), staged under `.tmp-checkpoint-N`
        and renamed to `checkpoint-N` only when complete: `kill -9` at any moment leaves no checkpoint that
        --resume would pick half written.

        1. stage  2. write every part  3. best-model bookkeeping + trainer state  4. rename  5. rotate.
        """
        # 1.
        run_dir = self._get_output_dir(trial=trial)
        final_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = staging_path(final_dir)
        self._prepare_staging(staging)
        # 2.
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        # 3.
        self._record_best_checkpoint(run_dir)
        if self.args.should_save:
            self._store_callback_states()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        # 4.
        self._publish(staging, final_dir)
        if self.args.push_to_hub:
            self._push_from_checkpoint(final_dir)
        # 5.
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _record_best_checkpoint(self, run_dir: str) -> None:
        best_step = self.state.best_global_step
        if self.args.save_strategy not in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) or not best_step:
            return
        best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.exists(best_dir):  # the current one is still staged
            self.state.best_model_checkpoint = best_dir

    def _store_callback_states(self) -> None:
        """What the stock checkpoint stores of `ExportableState` callbacks (early stopping, control)."""
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name, state = callback.__class__.__name__, callback.state()
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(state)
                else:
                    self.state.stateful_callbacks[name] = state

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DDP + EP: each EP rank's optimizer state (its experts differ) as safetensors; scheduler as stock."""
        if not self.ddp_expert_parallel:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_optimizer_slice(self.optimizer, output_dir, self.expert_parallel_groups)
        if self.args.should_save:
            with warnings.catch_warnings(record=True) as caught_warnings:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught_warnings)

    # ------------------------------------------------------------------ resuming

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """Stock training; `resume_from_checkpoint=True` takes the last complete checkpoint, and any checkpoint
        is checked for missing shards (one-line error) before a single tensor is loaded."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint-N directory in {self.args.output_dir} to resume from; "
                                 "train without resuming first")
        if self.args.should_save:
            remove_stale_staging(self.args.output_dir)
        if resume_from_checkpoint:
            check_checkpoint_complete(resume_from_checkpoint, self.args.world_size, self.expert_parallel_size,
                                      self.is_deepspeed_enabled, self.args.save_only_model)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Under EP the checkpoint's full model is sliced onto this rank (the stock load would refuse the
        [E, ...] expert shapes)."""
        if self.expert_parallel_groups is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        state = load_checkpoint_state_dict(resume_from_checkpoint)
        load_full_state_into(self.model, slice_full_state_dict(state, self.model))

    def _load_best_model(self) -> None:
        """`load_best_model_at_end` under EP: the best checkpoint's full model, sliced (DeepSpeed: the engine)."""
        if not self.ddp_expert_parallel:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.ddp_expert_parallel:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer_slice(self.optimizer, checkpoint, self.expert_parallel_groups)
        with warnings.catch_warnings(record=True) as caught_warnings:
            self.lr_scheduler.load_state_dict(
                torch.load(os.path.join(checkpoint, SCHEDULER_NAME), map_location="cpu", weights_only=True))
        reissue_pt_warnings(caught_warnings)


__all__ = ["MoESeq2SeqTrainer", "check_label_smoothing", "setup_expert_parallelism"]
