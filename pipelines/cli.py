"""The ``ddpm`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module, which exposes::

    HELP: str                                   # one line for ``ddpm --help``
    def add_arguments(parser) -> None           # flags, with a worked example in the parser's epilog
    def main(args: argparse.Namespace) -> int   # validates, calls one library function, returns the exit code

Only the chosen subcommand's module is imported, so ``ddpm --help`` stays fast and a subcommand pays only for
the libraries it uses. ``serve`` is loaded from ``deploy.cli`` by name: the CLI is the one place that composes the
layers, while ``pipelines`` itself never imports ``deploy`` (see ARCHITECTURE.md, Layers).

Failures print one line, ``ddpm <command>: error: <message>``, and exit 1; ``--verbose`` adds the traceback, and
lets Ray's own logging through to the terminal (``pipelines.ray_utils``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# subcommand -> module that implements it
SUBCOMMANDS: dict[str, str] = {
    "data": "pipelines.commands.data",
    "preprocess": "pipelines.commands.preprocess",
    "encode": "pipelines.commands.encode",
    "train": "pipelines.commands.train",
    "train-local": "pipelines.commands.train_local",
    "train-autoencoder": "pipelines.commands.train_autoencoder",
    "train-clip": "pipelines.commands.train_clip",
    "train-prior": "pipelines.commands.train_prior",
    "models": "pipelines.commands.models",
    "generate": "pipelines.commands.generate",
    "inpaint": "pipelines.commands.inpaint",
    "edit": "pipelines.commands.edit",
    "vary": "pipelines.commands.vary",
    "unclip": "pipelines.commands.unclip",
    "evaluate": "pipelines.commands.evaluate",
    "serve": "deploy.cli",
    "pipeline": "pipelines.commands.pipeline",
    "submit": "pipelines.commands.submit",
    "quickstart": "pipelines.commands.quickstart",
    "status": "pipelines.commands.status",
}


def _load(name: str):
    return importlib.import_module(SUBCOMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand's module is imported."""
    parser = argparse.ArgumentParser(
        prog="ddpm",
        description="Train and serve DDPM image generators on Ray, tracked in MLflow.",
        epilog="Run 'ddpm <command> --help' for a command's flags and a worked example.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="print the full traceback on failure, and Ray's own logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, add_help=False)
            continue
        module = _load(name)
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=getattr(module, "EXAMPLE", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--verbose", action="store_true",
                       help="print the full traceback on failure, and Ray's own logging")
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def _top_level_help() -> str:
    lines = ["usage: ddpm [--verbose] <command> [args]", "", "commands:"]
    width = max(map(len, SUBCOMMANDS))
    for name in SUBCOMMANDS:
        try:
            lines.append(f"  {name:<{width}} {_load(name).HELP}")
        except ModuleNotFoundError as exc:
            lines.append(f"  {name:<{width}} (unavailable: {exc})")
    lines += ["", "Run 'ddpm <command> --help' for a command's flags and a worked example."]
    return "\n".join(lines)


def missing_dependency(exc: ModuleNotFoundError) -> str:
    """One line for a Python that lacks a module the project needs: which module, which Python, and the remedies.
    A ``ddpm submit`` job runs whatever ``python`` is first on the head's PATH (a ``ray start`` from outside the venv)."""
    return (f"{sys.executable} has no module {exc.name!r}, which ddpm needs: run ddpm with the project's Python "
            f"(its venv, or the cluster image deploy/ uses; for a local 'ray start', start Ray from the venv: "
            f"docs/cluster.md), or give a submitted job its packages with ddpm submit --pip")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or command not in SUBCOMMANDS:
        if command is None and any(a in ("-h", "--help") for a in argv) or not argv:
            print(_top_level_help())
            return 0
        print(f"ddpm: error: unknown command {command!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    # --verbose is accepted anywhere before a "--" (after it, the words belong to the command that submit sends).
    cut = argv.index("--") if "--" in argv else len(argv)
    verbose = "--verbose" in argv[:cut]
    argv = [a for a in argv[:cut] if a != "--verbose"] + argv[cut:]
    from pipelines.ray_utils import keep_local_ray_on_loopback

    keep_local_ray_on_loopback()  # before any subcommand imports ray
    try:
        parser = build_parser(only=command)
    except ModuleNotFoundError as exc:  # this interpreter is not the project's environment
        print(f"ddpm {command}: error: {missing_dependency(exc)}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    args.verbose = verbose
    if verbose:  # Ray's own logging back on the terminal (pipelines.ray_utils), here and in child processes
        os.environ["DDPM_VERBOSE"] = "1"
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C; a command may say what it closed and where to resume
        print(f"ddpm {command}: interrupted" + (f"; {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"ddpm {command}: error: {missing_dependency(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # one clear line; the traceback on request
        if args.verbose:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"ddpm {command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
