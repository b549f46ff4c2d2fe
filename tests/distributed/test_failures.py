"""A lost pipeline worker's one error line: the root cause a worker reported, else what happened
to the rank that died."""

from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from neuroplex.distributed.failures import worker_failure
from neuroplex.distributed.parallel import PipelineError
from neuroplex.errors import TrainingDiverged


class Reports:
    """The parent's error queue, as filled by the workers."""

    def __init__(self, *items):
        self.items = list(items)

    def empty(self):
        return not self.items

    def get(self):
        return self.items.pop(0)


def test_the_reported_error_is_the_root_cause_not_the_lost_peer(tmp_path):
    died = ProcessExitedException("", error_index=0, error_pid=1, exit_code=1)
    lost = PipelineError("pipeline rank 0: sending to rank 1 failed: Connection closed by peer")
    diverged = TrainingDiverged("loss became nan at step 3 (epoch 1)")
    assert worker_failure(died, Reports((0, lost), (1, diverged)), tmp_path) is diverged
    only_lost = worker_failure(died, Reports((0, lost)), tmp_path)
    assert str(only_lost) == str(lost)  # no checkpoint yet: no resume hint
    silent = ProcessExitedException(
        "", error_index=1, error_pid=2, exit_code=-9, signal_name="SIGKILL"
    )
    assert (
        str(worker_failure(silent, Reports(), tmp_path)) == "pipeline rank 1 died (signal SIGKILL)"
    )
    bug = ProcessRaisedException("Traceback ...\n  ...\nIndexError: list index out of range", 1, 2)
    message = str(worker_failure(bug, Reports(), tmp_path))
    assert message == "pipeline rank 1 failed: IndexError: list index out of range"
