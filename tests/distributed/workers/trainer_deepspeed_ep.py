"""Worker: MoESeq2SeqTrainer trains our expert-parallel model under DeepSpeed ZeRO-2 with a DeepSpeed config
WITHOUT an "optimizer" section (the Trainer builds the optimizer), and resumes exactly.

`python -m torch.distributed.run --nproc_per_node=2 trainer_deepspeed_ep.py OUTPUT_DIR`
The trainer prepares the model for DeepSpeed itself (expert_parallel_size=2) and builds MoE optimizer groups:
without them DeepSpeed refuses the optimizer ("None of the param groups are marked as MoE"). Run A: 4 steps,
checkpoints at 2 and 4. Run B: a fresh process state (new model, Trainer) resumes from checkpoint-2: the
losses of steps 3-4 and every parameter equal run A's. `save_model` writes the full model (every expert).
"""

import os
import sys

from moe_training_common import MICRO_BATCH, SEQ, VOCAB, build_model, max_abs_diff, skip_deepspeed_shm_build

skip_deepspeed_shm_build()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import Seq2SeqTrainingArguments  # noqa: E402

from hf_moe_mt.parallel import gather_full_state_dict  # noqa: E402
from hf_moe_mt.training.trainer import MoESeq2SeqTrainer  # noqa: E402

DEEPSPEED = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(3, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index].flip(0)}


def train(output_dir: str, resume_from: str | None):
    model = build_model(kind="moe_mt")
    args = Seq2SeqTrainingArguments(output_dir=output_dir, per_device_train_batch_size=MICRO_BATCH, max_steps=4,
                                    learning_rate=1e-3, weight_decay=0.1, max_grad_norm=0.3, save_steps=2,
                                    logging_steps=1, report_to=[], use_cpu=True, seed=0, deepspeed=DEEPSPEED)
    trainer = MoESeq2SeqTrainer(model=model, args=args, train_dataset=RandomPairs(), expert_parallel_size=2)
    trainer.train(resume_from_checkpoint=resume_from)
    assert trainer.is_deepspeed_enabled and any(group.get("moe") for group in trainer.optimizer.param_groups)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    state = gather_full_state_dict(model, trainer.expert_parallel_groups)
    trainer.save_model(os.path.join(output_dir, "model"))
    saved = load_file(os.path.join(output_dir, "model", "model.safetensors"))
    assert all(torch.equal(saved[name], state[name]) for name in saved), "save_model wrote another model"
    assert saved["model.encoder.layers.1.mlp.experts.up_proj"].shape[0] == 4  # every expert, not rank 0's 2
    return losses, state


def main(output_dir: str) -> None:
    losses_a, state_a = train(os.path.join(output_dir, "a"), None)
    losses_b, state_b = train(os.path.join(output_dir, "b"), os.path.join(output_dir, "a", "checkpoint-2"))
    assert [losses_b[s] for s in (3, 4)] == [losses_a[s] for s in (3, 4)], (losses_a, losses_b)
    assert max_abs_diff(state_b, state_a) == 0.0
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"OK trainer zero2 ep=2 losses={[round(losses_a[s], 6) for s in sorted(losses_a)]}")


if __name__ == "__main__":
    main(sys.argv[1])
