"""A ``TorchDispatchMode`` that records every dispatched aten op that is not a view (shared test helper)."""

from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS = {"view", "reshape", "_unsafe_view", "split", "split_with_sizes", "unbind", "select", "slice", "as_strided",
            "t", "transpose", "expand", "squeeze", "unsqueeze", "alias", "detach", "diagonal", "permute", "narrow"}


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` leaves the names of the non-view ops in ``c.ops``."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
