"""python -m tinyserve: the command line, a thin dispatcher to subcommands.

Each subcommand is a module with `main(argv: list[str]) -> int` (the exit status) that parses its
own arguments; it is imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module whose main(argv) runs it, what it does)
SUBCOMMANDS = {
    "demo": (
        "tinyserve.demo",
        "the end-to-end continuous-batching decode simulation (demo --help)",
    ),
    "generate": (
        "tinyserve.engine.cli",
        "serve prompts with a transformers model through the engine (generate --help)",
    ),
}
# What the engine's command imports beyond the library (the `model` extra).
MODEL_PACKAGES = ("torch", "transformers", "gguf", "accelerate")


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS) + len(" [options]")
    lines = ["usage:"]
    for name, (_, summary) in SUBCOMMANDS.items():
        lines.append(f"  python -m tinyserve {f'{name} [options]':<{width}}  {summary}")
    for flag, summary in (
        ("--cmake-dir", "the folder for CMAKE_PREFIX_PATH / tinyserve_DIR"),
        ("--version", "the package version"),
        ("--help", "this message"),
    ):
        lines.append(f"  python -m tinyserve {flag:<{width}}  {summary}")
    return "\n".join(lines)


def _error(message: str) -> int:
    print(f"python -m tinyserve: {message}\n{_usage()}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if len(argv) > 1:
            return _error(f"{argv[0]} takes no arguments, got {' '.join(argv[1:])!r}")
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in SUBCOMMANDS:
        try:
            module = importlib.import_module(SUBCOMMANDS[command][0])
        except ModuleNotFoundError as error:
            if error.name not in MODEL_PACKAGES:
                raise
            print(
                f"python -m tinyserve {command}: needs {error.name}, which is not installed "
                "(pip install 'tinyserve[model]', or the `model` extra of a source install)",
                file=sys.stderr,
            )
            return 2
        return module.main(rest)
    if command in ("--cmake-dir", "--version"):
        if rest:
            return _error(f"{command} takes no arguments, got {' '.join(rest)!r}")
        import tinyserve

        print(tinyserve.cmake_dir() if command == "--cmake-dir" else tinyserve.__version__)
        return 0
    return _error(f"unknown command {command!r}")


if __name__ == "__main__":
    sys.exit(main())
