"""Plain nn.Module networks (no training logic)."""

from disc_pl.nets.dep import LossPredictor
from disc_pl.nets.duq import DUQHead, DUQNet
from disc_pl.nets.resnet import ResNet18

__all__ = ["DUQHead", "DUQNet", "LossPredictor", "ResNet18"]
