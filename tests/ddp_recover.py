"""recover() under torchrun: `torchrun --standalone --nproc_per_node=2 tests/ddp_recover.py OUT.pt`.

Every process passes the same global batches; recover() shards them, DistributedDataParallel
averages the gradients, and rank 0 saves the recovered state and the loss curve for the test to
compare with a single-process run of the same case.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # as tests/conftest.py: the test helpers, then examples.digits

from digits import batches, trained_mlp  # noqa: E402
from rpsconvert import convert  # noqa: E402
from rpsconvert.quality.recovery import recover  # noqa: E402
from rpsconvert.quality.sharding import final_barrier  # noqa: E402

STEPS = 12


def case():
    """The converted digits classifier, its original, and a recovery run: what both runs share."""
    teacher = trained_mlp()
    model = convert(teacher, ratio=1 / 8)
    history = recover(model, teacher, batches("calib", 64), steps=STEPS, lr=3e-3, eval_data=batches("heldout"), eval_every=4, quiet=True)
    return model, history


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    model, history = case()
    if torch.distributed.get_rank() == 0:
        torch.save({"state": model.state_dict(), "loss": history.loss, "after": history.after.relative_error}, out)
    # both ranks tear gloo down together: a rank that destroyed its group while the other was still
    # saving aborted now and then ("terminate called without an active exception", SIGABRT); the
    # barrier's work is kept to the end, as the command keeps it (quality/sharding.py `torchrun_job`)
    final_barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
