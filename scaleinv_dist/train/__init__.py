"""Training: the DeepSpeed loop, checkpoints, metrics, optimizers and LR schedules.

    from scaleinv_dist.train import train
    summary = train(load_config("configs/tiny.yaml", ["train.steps=20"]))

See docs/training.md. DeepSpeed is imported only when training starts (after the accelerator is
chosen), so importing this package is cheap.
"""
from ..cli import EXIT_NONFINITE, EXIT_OK, EXIT_PEER_FAILURE, EXIT_PREEMPTED, EXIT_USAGE
from .interrupts import NonFiniteLoss, PeerFailure, Preempted, TrainingInterrupted
from .loop import train

__all__ = ["train", "TrainingInterrupted", "Preempted", "NonFiniteLoss", "PeerFailure",
           "EXIT_OK", "EXIT_USAGE", "EXIT_NONFINITE", "EXIT_PEER_FAILURE", "EXIT_PREEMPTED"]
