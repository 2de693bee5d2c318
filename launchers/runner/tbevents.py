"""TensorBoard scalars, written with the ``tensorboard`` package.

The event file is TensorBoard's own format, written by its own code: ``Event`` / ``Summary``
messages from ``tensorboard.compat.proto``, framed (length, masked CRC-32C) by
``tensorboard.summary.writer.record_writer.RecordWriter``. One writer serves the torch and the
Keras runner: ``torch.utils.tensorboard.SummaryWriter`` goes through tensorboard's
``EventFileWriter``, whose ``tf.io.gfile`` calls import TensorFlow into a torch rank whenever
TensorFlow is installed (seconds of start-up and TensorFlow's C++ log lines), and ``tf.summary``
would need TensorFlow on the torch side. Scalars are ``simple_value`` summaries, which
TensorBoard's ``EventAccumulator.Scalars(tag)`` reads (``tests/test_run_e2e.py`` checks with it).

Imported lazily (``RunLog`` imports it when ``output.tensorboard`` is true), so that
``largebatch`` itself does not need the package.
"""
import os
import socket
import time

__all__ = ["EventWriter", "available"]


def available():
    """None when the ``tensorboard`` package can be imported, else the reason (one line)."""
    try:
        import tensorboard.compat.proto.event_pb2  # noqa: F401
        import tensorboard.summary.writer.record_writer  # noqa: F401
    except ImportError as err:
        return f"the tensorboard package is not installed ({err}); pip install tensorboard"
    return None


class EventWriter:
    """Append scalars to a new TensorBoard event file in ``log_dir``."""

    def __init__(self, log_dir):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        os.makedirs(log_dir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.0"
        self.path = os.path.join(log_dir, name)
        self._writer = RecordWriter(open(self.path, "ab"))
        self._add(event_pb2.Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _add(self, event):
        self._writer.write(event.SerializeToString())

    def scalars(self, step, values, wall_time=None):
        """Write ``{tag: number}`` at ``step`` (non-finite values are written as they are)."""
        if not values:
            return
        summary = self._summary_pb2.Summary(value=[
            self._summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()])
        self._add(self._event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step),
                                        summary=summary))

    def flush(self):
        self._writer.flush()

    def close(self):
        if not self._writer.closed:
            self._writer.close()
