"""Models usable without torchvision: a small CNN, ResNet-18/50 (He et al. 2016) and AlexNet-BN.

``zero_init_residual=True`` sets γ = 0 in the last BatchNorm of each residual block, so each
block starts as the identity (Goyal et al. 2017, §5.1) — helps large-batch early training.
"""
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv(32)-BN-ReLU-pool, conv(64)-BN-ReLU-pool, global average pool, linear. ``batchnorm=False``
    drops BN (no-BN nets are where plain SGD fails first at large batch, the LARS paper's case)."""

    def __init__(self, num_classes=10, in_channels=3, width=32, batchnorm=True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=not batchnorm), norm(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=not batchnorm), norm(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.last_bn = self.bn2
        self.shortcut = _shortcut(inplanes, planes, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.last_bn = self.bn3
        self.shortcut = _shortcut(inplanes, width, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(inplanes, planes, stride):
    if stride == 1 and inplanes == planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class ResNet(nn.Module):
    """ImageNet-style ResNet; ``small_input=True`` uses a 3×3 stem without max-pool (CIFAR-size images)."""

    def __init__(self, block, layers, num_classes=1000, in_channels=3, zero_init_residual=False, small_input=False):
        super().__init__()
        self.inplanes = 64
        if small_input:
            stem = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1)]
        self.stem = nn.Sequential(*stem)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def _make_layer(self, block, planes, blocks, stride):
        layers = []
        for i in range(blocks):
            layers.append(block(self.inplanes, planes, stride if i == 0 else 1))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes=1000, **kwargs):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet50(num_classes=1000, **kwargs):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


class AlexNetBN(nn.Module):
    """AlexNet-BN as used by You, Gitman, Ginsburg 2017 (arXiv 1708.03888): BVLC AlexNet
    (Krizhevsky et al. 2012; 96-256-384-384-256 convolutions, two 4096 fully connected layers)
    with Local Response Normalisation replaced by Batch Normalization, here after every
    convolution and fully connected hidden layer. Expects images of 64 pixels or more (224 as
    in the paper)."""

    def __init__(self, num_classes=1000, in_channels=3, dropout=0.5):
        super().__init__()

        def conv(cin, cout, k, s, p):
            return [nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels, 96, 11, 4, 2), nn.MaxPool2d(3, 2),
            *conv(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2),
            *conv(256, 384, 3, 1, 1), *conv(384, 384, 3, 1, 1), *conv(384, 256, 3, 1, 1), nn.MaxPool2d(3, 2))
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 6 * 6, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def alexnet_bn(num_classes=1000, in_channels=3):
    return AlexNetBN(num_classes=num_classes, in_channels=in_channels)
