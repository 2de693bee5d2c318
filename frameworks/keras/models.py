"""Small Keras models for examples, tests and benchmarks.

``small_cnn`` — conv/ReLU/pool blocks, global average pooling, a dense classifier;
``small_resnet`` — a CIFAR-style ResNet (He et al. 2016) with basic blocks and BatchNorm.
Both take the input shape (H, W, C) and the number of classes and return an uncompiled
functional ``keras.Model`` with softmax-free logits (use ``from_logits=True``).
"""
import keras
from keras import layers

from largebatch.validation import check_positive_int

__all__ = ["small_cnn", "small_resnet"]


def _check_shape(input_shape):
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(f"input_shape: expected (height, width, channels), got {input_shape!r}")
    for dim in input_shape:
        check_positive_int("input_shape", dim)
    return tuple(input_shape)


def small_cnn(input_shape=(32, 32, 3), num_classes=10, width=16, blocks=2, batch_norm=False, seed=None,
              name="small_cnn"):
    """``blocks`` × (Conv3x3(width·2^i) → [BatchNorm] → ReLU → MaxPool2), GAP, Dense(num_classes)."""
    input_shape = _check_shape(input_shape)
    check_positive_int("num_classes", num_classes)
    check_positive_int("width", width)
    check_positive_int("blocks", blocks)
    init = lambda i: keras.initializers.HeNormal(seed=None if seed is None else seed + i)  # noqa: E731
    inputs = keras.Input(input_shape)
    x = inputs
    for i in range(blocks):
        x = layers.Conv2D(width * 2 ** i, 3, padding="same", use_bias=not batch_norm,
                          kernel_initializer=init(i), name=f"conv{i + 1}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"bn{i + 1}")(x)
        x = layers.ReLU()(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(
        seed=None if seed is None else seed + blocks), name="fc")(x)
    return keras.Model(inputs, outputs, name=name)


def _basic_block(x, filters, stride, index, seed):
    def init(j):
        return keras.initializers.HeNormal(seed=None if seed is None else seed + 10 * index + j)
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, kernel_initializer=init(0),
                      name=f"block{index}_conv1")(x)
    y = layers.BatchNormalization(name=f"block{index}_bn1")(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init(1),
                      name=f"block{index}_conv2")(y)
    y = layers.BatchNormalization(name=f"block{index}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, kernel_initializer=init(2),
                                 name=f"block{index}_shortcut")(shortcut)
        shortcut = layers.BatchNormalization(name=f"block{index}_shortcut_bn")(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def small_resnet(input_shape=(32, 32, 3), num_classes=10, width=16, blocks_per_stage=(1, 1, 1), seed=None,
                 name="small_resnet"):
    """CIFAR-style ResNet: stem Conv3x3(width), stages of basic blocks with width·2^s filters
    (stride 2 at each stage but the first), GAP, Dense. (3, 3, 3) gives ResNet-20."""
    input_shape = _check_shape(input_shape)
    check_positive_int("num_classes", num_classes)
    check_positive_int("width", width)
    if not blocks_per_stage or not all(isinstance(b, int) and b > 0 for b in blocks_per_stage):
        raise ValueError(f"blocks_per_stage: expected positive integers, got {blocks_per_stage!r}")
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv",
                      kernel_initializer=keras.initializers.HeNormal(seed=seed))(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU()(x)
    index = 0
    for stage, blocks in enumerate(blocks_per_stage):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            index += 1
            x = _basic_block(x, width * 2 ** stage, stride, index, seed)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, name="fc", kernel_initializer=keras.initializers.GlorotUniform(
        seed=None if seed is None else seed + 1000))(x)
    return keras.Model(inputs, outputs, name=name)
