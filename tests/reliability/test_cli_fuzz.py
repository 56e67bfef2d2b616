"""The command line under fuzz: every subcommand, every flag, random and boundary values (hypothesis).

Whatever the values, ``ddpm <command>`` ends in bounded time with exit 0, or with exactly one
``ddpm <command>: error: ...`` line (exit 1), or argparse's usage line plus one such line (exit 2); never a
traceback. The flags come from the parsers themselves, so a flag added later is fuzzed too.

The inputs that would make a run do real work (the model, the data, the config) point at paths that do not exist,
so each example ends at validation or at the first missing input; ``quickstart`` is left out, since valid flags
start the whole pipeline (its flags are checked by ``tests/pipelines/test_quickstart.py``).
"""

from __future__ import annotations

import argparse
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import SUBCOMMANDS, build_parser, main

TIME_LIMIT_S = 60  # one example, validation and first failure included

# Values that reach for edges: signs, zero, 32/64-bit limits, non-finite floats, junk text.
INTS = ["-1", "0", "1", "2", "17", "4294967296", "99999999999999999999", "-99999999999999999999", "x", ""]
FLOATS = ["nan", "inf", "-inf", "-0", "0", "1e-300", "1e400", "0.5", "-2", "x", ""]
TEXTS = ["", "x", "/nonexistent/p", "s3://", "s3://no-such-bucket/p", "ü-ñ", "-", "a=b", "models:/", "1e999"]
SETS = ["train.lr=", "x", "train.lr=nan", "model.channel_mults=3", "a.b=c", "pipeline.num_workers=-1",
        "train.total_images=1e99", "train=3", "model.preset=nope", "train.lr=[1]"]

# What each command is always given, so that a run never does real work: missing inputs, and a Ray Jobs address
# where nothing listens. Flags named here are not fuzzed.
FIXED = {
    "data": ["digits", "--output", "{tmp}/data"],
    "preprocess": ["--input", "/nonexistent/raw", "--output", "{tmp}/processed", "--resolution", "8"],
    "train": ["--data", "/nonexistent/data", "--config", "/nonexistent/c.yaml", "--storage", "{tmp}/runs",
              "--name", "r"],
    "encode": ["--data", "/nonexistent/data", "--autoencoder", "/nonexistent/ae", "--output", "{tmp}/latents"],
    "train-local": ["--config", "/nonexistent/c.yaml", "--out", "{tmp}/local"],
    "train-autoencoder": ["--data", "/nonexistent/data", "--config", "/nonexistent/c.yaml", "--storage",
                          "{tmp}/runs", "--name", "r"],
    "train-clip": ["--data", "/nonexistent/data", "--config", "/nonexistent/c.yaml", "--storage", "{tmp}/runs",
                   "--name", "r"],
    "train-prior": ["--data", "/nonexistent/data", "--config", "/nonexistent/c.yaml", "--storage", "{tmp}/runs",
                    "--name", "r"],
    "generate": ["--model", "/nonexistent/model", "--out", "{tmp}/g.png"],
    "inpaint": ["--model", "/nonexistent/model", "--image", "/nonexistent/i.png", "--mask", "/nonexistent/m.png",
                "--out", "{tmp}/i.png"],
    "edit": ["--model", "/nonexistent/model", "--image", "/nonexistent/i.png", "--out", "{tmp}/e.png"],
    "vary": ["--model", "/nonexistent/model", "--image", "/nonexistent/i.png", "--out", "{tmp}/v.png"],
    "unclip": ["--prior", "/nonexistent/prior", "--decoder", "/nonexistent/decoder", "--register-as", "u"],
    "evaluate": ["--model", "/nonexistent/model", "--data", "/nonexistent/data", "--out", "{tmp}/eval"],
    "serve": ["--model", "/nonexistent/model"],
    "pipeline": ["--config", "/nonexistent/c.yaml"],
    "submit": ["--address", "http://127.0.0.1:1"],
}
AFTER = {"submit": ["--", "generate", "--model", "/nonexistent/model", "--out", "x.png"]}
COMMANDS = [name for name in SUBCOMMANDS if name != "quickstart"]


def flags_of(command: str) -> list[argparse.Action]:
    """The optional flags of ``command`` that the fuzz may set (not --help/--verbose, not the fixed ones)."""
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    fixed = set(FIXED.get(command, []))
    return [a for a in sub._actions if a.option_strings and a.dest not in ("help", "verbose")
            and not fixed & set(a.option_strings)]


def value_strategy(action: argparse.Action):
    if action.nargs == 0:
        return st.just(None)  # a switch: present or not
    if action.dest == "set":
        return st.sampled_from(SETS)
    if action.choices:
        return st.sampled_from([*map(str, action.choices), "nope", ""])
    kind = getattr(action.type, "__name__", None)
    return st.sampled_from({"int": INTS, "float": FLOATS}.get(kind, TEXTS))


@st.composite
def command_lines(draw, command: str, tmp: str) -> list[str]:
    if command == "models":  # its flags sit on its actions: fuzz the one that writes (promote) in an empty registry
        name, version = draw(st.sampled_from(TEXTS)), draw(st.sampled_from(INTS))
        alias = draw(st.sampled_from(["production", "staging", "nope"]))
        return ["models", "promote", name, version, f"--alias={alias}", f"--tracking-uri=sqlite:///{tmp}/m.db"]
    argv = [command, *(a.replace("{tmp}", tmp) for a in FIXED.get(command, []))]
    for action in draw(st.lists(st.sampled_from(flags_of(command)), max_size=4, unique_by=lambda a: a.dest)):
        value = draw(value_strategy(action))
        flag = action.option_strings[0]
        argv += [flag] if value is None else [f"{flag}={value}"]  # --flag=value: values may start with "-"
    return argv + AFTER.get(command, [])


def test_the_fixed_flags_satisfy_every_parser():
    """Each fuzzed command gets its required flags, so that an example reaches the command and not only argparse."""
    for command in COMMANDS:
        argv = [command, *FIXED.get(command, []), *AFTER.get(command, [])]
        if command == "models":
            argv = ["models", "promote", "m", "1", "--alias=production"]
        build_parser(only=command).parse_args(argv)  # SystemExit(2) names the missing flag


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_fails_in_one_line_or_works(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative defaults (configs/digits.yaml, .ddpm/) do not exist here
    monkeypatch.setenv("DDPM_HOME", str(tmp_path / "home"))
    seen: dict[int, int] = {}
    reached = [0]  # examples that argparse accepted, so that the command's main() ran its own checks

    @settings(max_examples=12, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argv=command_lines(command, str(tmp_path)))
    def run(argv):
        started = time.monotonic()
        try:
            build_parser(only=command).parse_args(argv)
            reached[0] += 1
        except SystemExit:  # argparse refused it: main() will say so
            pass
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        seconds = time.monotonic() - started
        err = capsys.readouterr().err
        seen[code] = seen.get(code, 0) + 1
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("generated ")]
        assert seconds < TIME_LIMIT_S, (argv, seconds)
        assert code in (0, 1, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 1:
            assert len(lines) == 1 and lines[0].startswith(f"ddpm {command}: error: "), (argv, err)
        elif code == 2:  # argparse: usage, then "ddpm <command>[ <action>]: error: ..."
            assert lines[-1].startswith(f"ddpm {command}") and ": error: " in lines[-1], (argv, err)

    run()
    print(f"\n{command}: exit codes {dict(sorted(seen.items()))}, {reached[0]} past argparse")
    assert set(seen) - {0}, "every example succeeded: the fuzz never reached a refusal"
    assert reached[0], f"no example got past argparse: ddpm {command}'s own checks were never run"
