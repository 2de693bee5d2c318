"""Your own model and data for largebatch: an MLP with named layers, on NumPy arrays.

exp.yaml beside this file names ``my_model.py:mlp`` (model.factory) and ``my_model.py:blobs``
(data.factory); ``largebatch run exp.yaml`` trains it with the YAML's optimizer and schedule.
"""
import numpy as np
import torch


class MLP(torch.nn.Module):
    def __init__(self, features: int, num_classes: int, hidden: int):
        super().__init__()
        self.encoder = torch.nn.Linear(features, hidden)
        self.head = torch.nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def mlp(input_shape, num_classes, hidden=64):
    """largebatch passes input_shape (one sample's shape) and num_classes (from the labels)."""
    torch.manual_seed(0)                     # the same initial weights on every rank
    return MLP(input_shape[0], num_classes, hidden)


def blobs(samples=2048, features=16, classes=4, seed=0):
    """(train, val): Gaussian blobs, one per class, as (x, y) NumPy arrays with integer labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * 0.5
    y = rng.integers(0, classes, samples)
    x = (centres[y] + rng.standard_normal((samples, features))).astype(np.float32)
    split = samples * 7 // 8
    return (x[:split], y[:split]), (x[split:], y[split:])
