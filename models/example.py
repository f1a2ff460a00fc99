"""A user's own model, quantized end to end: `dvc exp run -S train.model=models/example.py:TinyResNet`."""
import torch.nn.functional as F
from torch import nn


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(self.stem(x), 2)
        x = F.relu(x + self.conv2(self.conv1(x)))  # the residual add
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
