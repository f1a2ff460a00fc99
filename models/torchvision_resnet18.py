"""torchvision's ResNet-18 with a 10-class head: ``dvc exp run -S train.model=models/torchvision_resnet18.py:resnet18``.

Unchanged from torchvision (its ImageNet stem on 32 x 32 images); each ``BasicBlock`` calls its one ``self.relu``
twice, which the quantizer makes two nodes (``layer1.0.relu``, ``layer1.0.relu@2``).
"""
import torchvision
from torch import nn


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)
