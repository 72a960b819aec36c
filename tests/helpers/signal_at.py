"""A callback that sends a signal to its own process in the middle of a step (before the optimizer step),
as a scheduler's SIGTERM or SLURM's SIGUSR1 would arrive: the run must finish that step consistently."""

import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
