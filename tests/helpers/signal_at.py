"""A callback that sends a signal to its own process in the middle of a step (before the optimizer step),
as a scheduler's SIGTERM or SLURM's SIGUSR1 would arrive: the run must finish that step consistently.

``only_if_env``: fire only while that environment variable is set, so a run's recorded config (which lists this
callback) can be resumed without the signal arriving again."""

import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM", only_if_env: str | None = None) -> None:
        self.step, self.signum, self.only_if_env = step, getattr(signal, signal_name), only_if_env

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and (self.only_if_env is None or os.environ.get(self.only_if_env)):
            os.kill(os.getpid(), self.signum)
