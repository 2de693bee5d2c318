"""Framework-independent data: synthetic images, an image-folder loader, sharding by rank.

Batches are NumPy arrays: images NHWC float32 (normalised), labels int64. The torch runner
transposes the built-in images (``nhwc_images``) to NCHW; Keras takes them as they are. The
user's own data (:mod:`.user`) reaches the model as given.

Sharding (Goyal et al. §3: "shuffled and partitioned across workers each epoch"): every epoch
all ranks draw the same permutation (seeded by train.seed and the epoch), keep the first
steps_per_epoch × global_batch images, and rank r takes every size-th one from position r.
Each rank sees a disjoint 1/size of the epoch, and all ranks make the same number of steps.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from largebatch.config import IMAGE_EXTENSIONS

__all__ = ["SyntheticImages", "ImageFolder", "DataError", "build_datasets", "epoch_batches", "eval_batches",
           "Prefetcher"]

MEAN = {3: (0.485, 0.456, 0.406), 1: (0.449,)}
STD = {3: (0.229, 0.224, 0.225), 1: (0.226,)}


class DataError(ValueError):
    """A data problem found at run time; the message names the YAML key."""


class SyntheticImages:
    """Deterministic, learnable images: a fixed random pattern and colour per class, plus noise.

    Image i of split s has label labels[i] and pixels pattern[label] + noise, the noise drawn
    from a fixed bank; the same (seed, split, i) always gives the same image on every rank.
    """

    nhwc_images = True                  # the torch runner transposes to NCHW

    def __init__(self, samples, image_size, channels, num_classes, seed, split="train"):
        shape = (image_size, image_size, channels)
        rng = np.random.default_rng([seed, 7])
        # a class = a random texture plus a class colour (channel offsets): learnable by a small
        # CNN with global pooling in a few dozen steps, as a quick end-to-end check should be
        colours = rng.standard_normal((num_classes, 1, 1, channels))
        self.patterns = (rng.standard_normal((num_classes,) + shape) + colours).astype(np.float32)
        bank = int(min(64, max(4, 2 ** 25 // (4 * int(np.prod(shape))))))
        self.noise = rng.standard_normal((bank,) + shape).astype(np.float32)
        split_rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        self.labels = split_rng.integers(0, num_classes, samples).astype(np.int64)
        self.offset = 0 if split == "train" else bank // 2
        self.num_classes = num_classes

    def __len__(self):
        return len(self.labels)

    def batch(self, indices, epoch=0, train=True):
        indices = np.asarray(indices)
        labels = self.labels[indices]
        noise = self.noise[(indices * 7 + self.offset + (epoch if train else 0)) % len(self.noise)]
        return self.patterns[labels] + noise, labels


class ImageFolder:
    """``root/<class>/**/<image>`` (the ImageNet / torchvision layout), decoded with Pillow.

    train: resize the shorter side to ``resize``, random ``image_size`` crop, random
    horizontal flip (``augment``); eval: resize, centre crop. Randomness is seeded by
    (seed, epoch, index), so runs are repeatable.
    """

    nhwc_images = True

    def __init__(self, root, image_size, resize, channels, classes=None, key="data.path", augment=True, seed=0):
        self.root, self.image_size, self.resize, self.channels = root, image_size, resize, channels
        self.augment, self.seed = augment, seed
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if classes is None:
            classes = found
        else:
            extra = sorted(set(found) - set(classes))
            if extra:
                raise DataError(f"{key}: class folder {extra[0]!r} is not a class of data.path")
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        files, labels = [], []
        for c in found:
            for dirpath, dirnames, names in os.walk(os.path.join(root, c)):
                dirnames.sort()
                for n in sorted(names):
                    if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."):
                        files.append(os.path.join(dirpath, n))
                        labels.append(index[c])
        if not files:
            raise DataError(f"{key}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)
        self._mean = np.asarray(MEAN[channels], np.float32)
        self._std = np.asarray(STD[channels], np.float32)

    def __len__(self):
        return len(self.files)

    def load(self, i, epoch=0, train=True):
        from PIL import Image
        rng = np.random.default_rng([self.seed, epoch, int(i)]) if train and self.augment else None
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                scale = self.resize / min(w, h)
                im = im.resize((max(self.resize, round(w * scale)), max(self.resize, round(h * scale))),
                               Image.BILINEAR)
                w, h = im.size
                s = self.image_size
                if rng is not None:
                    left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
                else:
                    left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
                if rng is not None and rng.random() < 0.5:
                    im = im.transpose(Image.FLIP_LEFT_RIGHT)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as err:
            raise DataError(f"cannot read image {self.files[i]!r} ({err})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return (arr - self._mean) / self._std

    def batch(self, indices, epoch=0, train=True):
        indices = np.asarray(indices)
        x = np.stack([self.load(i, epoch, train) for i in indices])
        return x, self.labels[indices]


def build_datasets(cfg, derived):
    """(train, val or None) for the resolved config; ``derived`` gets num_classes, sizes. The
    user's own data (data.kind arrays / python): :func:`largebatch.runner.user.build_data`."""
    data, seed = cfg["data"], cfg["train"]["seed"]
    if data["kind"] in ("arrays", "python"):
        from .user import build_data
        return build_data(cfg, derived)
    size, channels = derived["image_size"], data["channels"]
    if data["kind"] == "synthetic":
        n_classes = derived["num_classes"]
        train = SyntheticImages(data["samples"], size, channels, n_classes, seed, "train")
        val = (SyntheticImages(data["val_samples"], size, channels, n_classes, seed, "val")
               if data["val_samples"] else None)
    else:
        train = ImageFolder(data["path"], size, derived["resize"], channels, augment=data["augment"], seed=seed)
        val = (ImageFolder(data["val_path"], size, derived["resize"], channels, classes=train.classes,
                           key="data.val_path", seed=seed) if data["val_path"] else None)
    derived["num_classes"] = train.num_classes
    derived["train_samples"] = len(train)
    derived["val_samples"] = len(val) if val is not None else 0
    return train, val


def epoch_batches(n, epoch, *, seed, rank, size, per_worker, accumulation, steps, shuffle=True):
    """This rank's micro-batches for one epoch: an int array (steps × accumulation, per_worker)."""
    order = np.random.default_rng([seed, 1000 + epoch]).permutation(n) if shuffle else np.arange(n)
    used = order[: steps * per_worker * accumulation * size]
    return used[rank::size].reshape(steps * accumulation, per_worker)


def eval_batches(n, *, rank, size, batch):
    """This rank's evaluation batches: every size-th image from ``rank``, all images covered."""
    mine = np.arange(rank, n, size)
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


class Prefetcher:
    """Iterate ``dataset.batch(b, epoch, train)`` over ``batches`` with ``workers`` threads
    loading ahead (Pillow releases the GIL while decoding and resizing)."""

    def __init__(self, dataset, batches, epoch=0, train=True, workers=2):
        self.dataset, self.batches, self.epoch, self.train = dataset, list(batches), epoch, train
        self.workers = workers

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        if self.workers <= 0 or isinstance(self.dataset, SyntheticImages):
            for b in self.batches:
                yield self.dataset.batch(b, self.epoch, self.train)
            return
        depth = 2 * self.workers
        with ThreadPoolExecutor(self.workers, thread_name_prefix="lb-data") as pool:
            pending = [pool.submit(self.dataset.batch, b, self.epoch, self.train) for b in self.batches[:depth]]
            nxt = len(pending)
            for i in range(len(self.batches)):
                result = pending[i].result()
                if nxt < len(self.batches):
                    pending.append(pool.submit(self.dataset.batch, self.batches[nxt], self.epoch, self.train))
                    nxt += 1
                pending[i] = None
                yield result
