"""The folder both model artifacts are stored as: ``config.json`` beside safetensors weights. Nothing is unpickled.

A DDPM checkpoint (``ddpm.checkpoint``) and an autoencoder (``ddpm.autoencoder``) each read and write such a folder
through these functions, so a bad file gets the same one-line error from either. Writing puts ``config.json`` last:
a folder with a config has complete weights beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
               type(None): "null"}


class CheckpointError(ValueError):
    """A model folder that is missing, truncated, or does not match its own config."""


def write_folder(path: str | Path, tensors: dict[str, torch.Tensor], config: dict,
                 weights_file: str = WEIGHTS_FILE) -> Path:
    """Write ``tensors`` (contiguous CPU tensors) to ``weights_file`` and then ``config`` to config.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / weights_file))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def read_config(path: str | Path, *, what: str, error: type[CheckpointError] = CheckpointError) -> dict:
    """The folder's config.json as a dict, or ``error`` in one line: no file (``what`` says which folder was
    expected, e.g. "a ddpm checkpoint folder"), bytes that are not UTF-8 JSON, or JSON that is not an object."""
    path = Path(path)
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no {CONFIG_FILE}; not {what}") from None
    except IsADirectoryError:
        raise error(f"{file}: a folder, not a file; not {what}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{file}: invalid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise error(f"{file}: expected a JSON object, got {_JSON_TYPES.get(type(config), 'something else')}")
    return config


def read_weights(file: str | Path, error: type[CheckpointError] = CheckpointError) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (plain tensors, no code execution), or ``error`` in one line."""
    file = Path(file)
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise error(f"{file.parent}: no {file.name}") from None
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise error(f"{file}: unreadable or truncated ({exc})") from None


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], folder: str | Path,
                  error: type[CheckpointError] = CheckpointError) -> None:
    """Refuse (``error``, one line) weights whose names or shapes differ from the model's ``expected`` tensors (its
    state dict, or its parameters), naming how many differ and the first, so a folder whose config.json does not
    describe its weights is never half loaded."""
    problems = [f"missing {k}" for k in expected.keys() - state.keys()]
    problems += [f"unexpected {k}" for k in state.keys() - expected.keys()]
    problems += [f"{k}: shape {tuple(state[k].shape)} != {tuple(t.shape)}"
                 for k, t in expected.items() if k in state and state[k].shape != t.shape]
    if problems:
        raise error(f"{folder}: weights do not match config.json ({len(problems)} problems, "
                    f"first: {sorted(problems)[0]})")
