"""Triton kernels, installed as ``fastadalora.kernels``.

Each module holds ``@triton.jit`` kernels and their plain host launchers, nothing else:
``dropout`` (the counter-based keep-mask law), ``adapter_forward`` (shrink, rank expand),
``adapter_backward`` (one pass over g, dA, the partial sums; dx is the rank expand),
``sensitivity`` (the allocator's EMA/score pass) and ``_config`` (rank tiers, block sizes, the fp32
dot precision, token splits, the ahead-of-time compile descriptions).
"""

if __name__ != "fastadalora.kernels":
    # From a checkout's root this folder is also importable as the top-level `kernels`, a name that belongs
    # to the Hugging Face `kernels` package: bitsandbytes runs `from kernels import get_kernel`, transformers
    # probes `import kernels` for a version.  The probe must keep working (it finds no `__version__` and
    # concludes the package is not usable); every name imported from here raises an ImportError saying what
    # this folder is.
    _MESSAGE = (f"{__file__.rsplit('/', 1)[0]} is fastadalora.kernels, not the Hugging Face `kernels` package "
                "(it is on sys.path because the current directory is a fastadalora checkout); import "
                "fastadalora.kernels for ours, or `pip install kernels` for theirs")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(_MESSAGE, name=__name__)
