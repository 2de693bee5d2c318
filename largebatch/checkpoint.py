"""Framework-neutral checkpoint files: atomic writes, integrity checks, keep-last-K, resume lookup.

A checkpoint file is::

    b"LBCKPT1\\n" | 8-byte big-endian manifest length | manifest (UTF-8 JSON) | payload

The manifest records the payload's size and SHA-256, the framework, step and epoch, a hash of
the training-relevant configuration and the model signature (parameter names and shapes). The
payload is whatever the framework adapter serialised (``torch.save`` bytes for torch, ``np.savez``
bytes of named arrays for Keras).

Writes are atomic: a temporary file in the same folder, ``fsync``, ``os.replace``, then an fsync
of the folder. A reader therefore sees either the previous file or the complete new one; a file
that is nevertheless damaged (disk, copy, truncation) is refused with one line, see
:class:`CheckpointError`. Nothing here imports torch or TensorFlow.
"""
import hashlib
import json
import os
import re
import struct
import tempfile

__all__ = ["CheckpointError", "write", "read", "read_manifest", "config_hash", "model_signature",
           "list_checkpoints", "latest", "prune", "checkpoint_name", "check_compatible"]

MAGIC = b"LBCKPT1\n"
_LEN = struct.Struct(">Q")
FORMAT_VERSION = 1
_NAME = re.compile(r"^epoch-(\d+)\.(?:pt|ckpt)$")
# the file suffix per framework (same format): torch keeps its historical ".pt"
_SUFFIX = {"torch": ".pt", "keras": ".ckpt"}
# configuration sections/keys that do not change what a checkpoint means
_CONFIG_IGNORED = {"output", "launcher", "description", "name", "derived", "source"}
_TRAIN_IGNORED = {"resume", "log_every", "eval", "epochs", "steps", "on_nonfinite", "check_ranks_every"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; ``str(err)`` is one line naming the file and the problem."""


def checkpoint_name(epoch, framework="torch"):
    """``epoch-NNNN.pt`` (torch) or ``epoch-NNNN.ckpt`` (keras); both are this module's format."""
    return f"epoch-{epoch:04d}{_SUFFIX.get(framework, '.ckpt')}"


def config_hash(cfg):
    """SHA-256 (first 16 hex digits) of the configuration that determines the trajectory
    (model, data, batch, optimizer, schedule, seed); output and launcher settings are left out."""
    doc = {k: v for k, v in cfg.items() if k not in _CONFIG_IGNORED}
    if isinstance(doc.get("train"), dict):
        doc["train"] = {k: v for k, v in doc["train"].items() if k not in _TRAIN_IGNORED}
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_signature(named_shapes):
    """A short hash of [(name, shape), ...] (parameters and buffers), plus their count."""
    items = [[str(n), [int(s) for s in shape]] for n, shape in named_shapes]
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    return {"hash": digest, "tensors": len(items)}


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write(path, payload, manifest):
    """Atomically write ``payload`` (bytes) with ``manifest`` (a JSON-able dict) to ``path``."""
    payload = bytes(payload)
    manifest = dict(manifest, format=FORMAT_VERSION, payload_bytes=len(payload),
                    payload_sha256=hashlib.sha256(payload).hexdigest())
    head = json.dumps(manifest, sort_keys=True, default=str).encode()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC)
            fh.write(_LEN.pack(len(head)))
            fh.write(head)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
    return path


def _open(path):
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path}: expected a file, got a folder") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read ({err.strerror or err})") from None
    return fh


def _read_head(fh, path):
    magic = fh.read(len(MAGIC))
    if magic != MAGIC:
        if len(magic) < len(MAGIC):
            raise CheckpointError(f"checkpoint {path}: truncated ({len(magic)} bytes, not a complete header)")
        raise CheckpointError(f"checkpoint {path}: not a largebatch checkpoint (bad header)")
    raw = fh.read(_LEN.size)
    if len(raw) < _LEN.size:
        raise CheckpointError(f"checkpoint {path}: truncated (header cut short)")
    (n,) = _LEN.unpack(raw)
    if n > 64 << 20:
        raise CheckpointError(f"checkpoint {path}: corrupted (manifest length {n})")
    head = fh.read(n)
    if len(head) < n:
        raise CheckpointError(f"checkpoint {path}: truncated (manifest cut short)")
    try:
        manifest = json.loads(head.decode())
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"checkpoint {path}: corrupted (manifest is not JSON)") from None
    if not isinstance(manifest, dict) or "payload_bytes" not in manifest or "payload_sha256" not in manifest:
        raise CheckpointError(f"checkpoint {path}: corrupted (manifest lacks payload size/hash)")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r} is not supported "
                              f"(expected {FORMAT_VERSION})")
    return manifest


def read_manifest(path):
    """The manifest only (no payload check)."""
    with _open(path) as fh:
        return _read_head(fh, path)


def read(path):
    """(manifest, payload bytes) after checking size and SHA-256; CheckpointError otherwise."""
    with _open(path) as fh:
        manifest = _read_head(fh, path)
        payload = fh.read()
    want = manifest["payload_bytes"]
    if len(payload) < want:
        raise CheckpointError(f"checkpoint {path}: truncated (payload has {len(payload)} of {want} bytes)")
    if len(payload) > want:
        raise CheckpointError(f"checkpoint {path}: corrupted ({len(payload) - want} bytes after the payload)")
    if hashlib.sha256(payload).hexdigest() != manifest["payload_sha256"]:
        raise CheckpointError(f"checkpoint {path}: corrupted (payload SHA-256 does not match the manifest)")
    return manifest, payload


def check_compatible(path, manifest, *, framework, signature, cfg_hash=None):
    """Refuse a checkpoint of another framework or model. Returns a warning line (or None)
    when the training configuration differs (allowed: e.g. more epochs)."""
    if manifest.get("framework") != framework:
        raise CheckpointError(f"checkpoint {path}: written by framework {manifest.get('framework')!r}, "
                              f"this run is {framework!r}")
    theirs = manifest.get("model_signature") or {}
    if theirs.get("hash") != signature["hash"]:
        raise CheckpointError(
            f"checkpoint {path}: from another model (model {manifest.get('model')!r}, {theirs.get('tensors')} "
            f"tensors, signature {theirs.get('hash')}; this run: {signature['tensors']} tensors, "
            f"signature {signature['hash']})")
    if cfg_hash is not None and manifest.get("config_hash") not in (None, cfg_hash):
        return (f"checkpoint {path}: written with a different training configuration "
                f"(config hash {manifest.get('config_hash')}, now {cfg_hash}); resuming anyway")
    return None


def list_checkpoints(folder):
    """[(epoch, path)] of ``epoch-NNNN.pt`` / ``epoch-NNNN.ckpt`` files in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in os.listdir(folder):
        m = _NAME.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(out)


def latest(folder):
    """The newest checkpoint's path in ``folder``, or None."""
    items = list_checkpoints(folder)
    return items[-1][1] if items else None


def prune(folder, keep):
    """Remove all but the newest ``keep`` checkpoints (keep <= 0: keep all). Returns removed paths."""
    if keep is None or keep <= 0:
        return []
    items = list_checkpoints(folder)
    removed = []
    for _, path in items[:-keep]:
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed
