"""What the non-finite guards of both adapters report (framework-neutral, no torch/TF import)."""

__all__ = ["NonFinite"]


class NonFinite:
    """One update with a NaN/Inf: ``step`` (1-based update), ``layer`` (parameter name or
    variable path), ``kind`` ('gradient' | 'trust ratio'), ``value`` ('nan' | 'inf' | 'nan/inf').
    ``message`` is the one line the runners print."""

    def __init__(self, step, layer, kind, value):
        self.step, self.layer, self.kind, self.value = step, layer, kind, value

    @property
    def message(self):
        return f"step {self.step}: non-finite {self.kind} ({self.value}) in layer '{self.layer}'"

    def __repr__(self):
        return f"NonFinite({self.message!r})"
