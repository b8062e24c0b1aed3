"""The exceptions the CLI turns into one line on stderr instead of a traceback.

`UserError` means "the user gave us bad input" (exit code 2). `Stopped` means training stopped on
SIGINT / SIGTERM with a checkpoint saved (exit 128 + the signal's number); `Diverged`, that it
stopped after `train.max_skipped_steps` steps in a row had non-finite gradients (exit 1;
trainer/stop.py); `Hung`, that a collective waited past `parallel.timeout_s` (exit 1).
"""

import signal


class UserError(Exception):
    """Bad input from the user: a config key, a value, a file. The message names it."""


class Stopped(Exception):
    """Training stopped on a signal after `step`, with a checkpoint of that step saved."""

    def __init__(self, signum: int, step: int, steps: int, checkpoint: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} of {steps}; "
                         f"checkpoint {checkpoint} saved. The same command resumes from it.")
        self.signum = signum


class RunFailed(Exception):
    """Training cannot go on (exit 1); the message says why and what is left."""


class Hung(RunFailed):
    """A collective waited longer than `parallel.timeout_s`: names the operation and the ranks that
    did not answer (trainer/runtime.py)."""


class Diverged(RunFailed):
    """Training stopped: too many steps in a row had non-finite gradients (none reached the weights)."""
