"""python -m tinyserve: the command line.

python -m tinyserve demo [options]   the end-to-end continuous-batching decode simulation
python -m tinyserve generate [opts]  serve prompts with a transformers model through the engine
python -m tinyserve --cmake-dir      the folder for CMAKE_PREFIX_PATH / tinyserve_DIR
python -m tinyserve --version
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--cmake-dir"]:
        import tinyserve

        print(tinyserve.cmake_dir())
        return 0
    if argv[:1] == ["--version"]:
        import tinyserve

        print(tinyserve.__version__)
        return 0
    if argv[:1] == ["demo"]:
        from . import demo

        return demo.main(argv[1:])
    if argv[:1] == ["generate"]:
        from .engine import cli

        return cli.main(argv[1:])
    print(__doc__.strip(), file=sys.stderr if argv else sys.stdout)
    return 2 if argv and argv[0] not in ("-h", "--help") else 0


if __name__ == "__main__":
    sys.exit(main())
