"""`hf-moe-mt train ARGS`, SIGKILLed in the middle of writing checkpoint $KILL_AT_CHECKPOINT: after its model
and optimizer are staged, before the RNG and trainer state and before the rename. A real `kill -9`
(no cleanup, no exception handlers), at the most damaging moment for a checkpoint."""

import os
import signal
import sys

from hf_moe_mt.cli import main
from hf_moe_mt.training.trainer import MoESeq2SeqTrainer

KILL_STEP = int(os.environ["KILL_AT_CHECKPOINT"])
_save_rng_state = MoESeq2SeqTrainer._save_rng_state


def _save_rng_state_or_die(self, output_dir):
    if self.state.global_step == KILL_STEP:
        os.kill(os.getpid(), signal.SIGKILL)
    return _save_rng_state(self, output_dir)


MoESeq2SeqTrainer._save_rng_state = _save_rng_state_or_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
