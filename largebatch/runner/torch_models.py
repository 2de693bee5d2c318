"""Models the runner needs that largebatch.torch.models does not (yet) provide.

``alexnet_bn``: AlexNet-BN as used by You, Gitman, Ginsburg 2017 (arXiv 1708.03888): BVLC
AlexNet (Krizhevsky et al. 2012; 96-256-384-384-256 convolutions, two 4096 fully connected
layers) with Local Response Normalisation replaced by Batch Normalization, here after every
convolution and fully connected hidden layer. Expects images of 64 pixels or more (224 as in
the paper).
"""
from torch import nn

__all__ = ["AlexNetBN", "alexnet_bn"]


class AlexNetBN(nn.Module):
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
