"""Triton kernels, installed as ``fastadalora.kernels``.

Each module holds ``@triton.jit`` kernels and their plain host launchers, nothing else:
``dropout`` (the Philox keep-mask helper), ``adapter_forward`` (shrink, expand),
``adapter_backward`` (dx, dA, dB, dE partials), ``sensitivity`` (the allocator's EMA/score pass).
"""
