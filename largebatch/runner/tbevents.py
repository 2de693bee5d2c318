"""A dependency-free TensorBoard scalar writer.

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord-framed ``Event`` protocol buffers.
Scalars need three small messages, encoded here by hand, so that both the torch and the Keras
runner write TensorBoard logs without the ``tensorboard`` package (which tensorflow-cpu 2.21
no longer installs, and which ``torch.utils.tensorboard`` needs):

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }

Records: uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the data
(the TFRecord format).
"""
import os
import socket
import struct
import time

__all__ = ["EventWriter", "crc32c", "read_scalars"]


def _make_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _make_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc):
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n):
    n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step, wall_time, *, file_version=None, scalars=None):
    out = struct.pack("<Bd", 1 << 3 | 1, wall_time) + _varint(2 << 3) + _varint(int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + struct.pack("<Bf", 2 << 3 | 5, float(value)))
            for tag, value in scalars.items())
        out += _field_bytes(5, summary)
    return out


class EventWriter:
    """Append scalars to a TensorBoard event file in ``log_dir``."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = os.path.join(log_dir, name)
        self._fh = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, data):
        header = struct.pack("<Q", len(data))
        self._fh.write(header + struct.pack("<I", _masked(crc32c(header))) + data
                       + struct.pack("<I", _masked(crc32c(data))))

    def scalars(self, step, values, wall_time=None):
        """Write ``{tag: number}`` at ``step`` (non-finite values are written as they are)."""
        if values:
            self._write(_event(step, time.time() if wall_time is None else wall_time, scalars=values))

    def flush(self):
        self._fh.flush()

    def close(self):
        if not self._fh.closed:
            self._fh.close()


def _read_varint(buf, i):
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(buf):
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def read_scalars(path):
    """[(step, tag, value)] from an event file, checking every CRC (for tests and tools)."""
    out = []
    with open(path, "rb") as fh:
        data = fh.read()
    i = 0
    while i < len(data):
        header = data[i:i + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked(crc32c(header)):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        record = data[i + 12:i + 12 + length]
        if struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] != _masked(crc32c(record)):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + length
        step = 0
        for number, _, value in _fields(record):
            if number == 2:
                step = value
            elif number == 5:
                for n, _, val in _fields(value):
                    if n == 1:
                        tag, simple = None, None
                        for m, _, v in _fields(val):
                            if m == 1:
                                tag = v.decode()
                            elif m == 2:
                                simple = struct.unpack("<f", v)[0]
                        out.append((step, tag, simple))
    return out
