"""``python -m fastadalora demo|bench`` (also the console script ``fastadalora``)."""

from __future__ import annotations

import sys

USAGE = """usage: fastadalora {demo,bench} [options]

  demo    fine-tune a small transformer with AdaLoRA offline (about a minute on CPU);
          `fastadalora demo --help` lists the options
  bench   the benchmark summary vs PEFT (needs a source checkout: it runs `python -m bench`)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        demo_main(rest)
        return 0
    if command == "bench":
        import os

        if os.path.isfile(os.path.join(os.getcwd(), "bench", "__main__.py")) and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # the console script does not put the checkout on sys.path
        try:
            from bench.__main__ import main as bench_main
        except ImportError:
            print("fastadalora bench: the benchmark suite lives in the source checkout's bench/ folder; run "
                  "`python -m bench` from the repository root", file=sys.stderr)
            return 2
        return bench_main(rest) or 0
    print(f"fastadalora: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
