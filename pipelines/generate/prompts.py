"""A generation job's prompts: ``--prompts FILE`` read and checked, which prompt each image gets, and the warning
lines for what tokenizing them lost.

A prompts file is one prompt a line (blank lines skipped), or JSONL when its first non-blank line is a JSON object:
one ``{"prompt": "...", "negative_prompt": "..."}`` a line (``negative_prompt`` optional). Prompts are numbered
k = 0, 1, ... in file order (prompts, not lines). With ``--num-images n`` each prompt gets n images: image
i = k n + j of the job is prompt k's j-th, from seed (K + j) mod 2^32 (``Plan.per_prompt``), so prompt k at seed
K + j is, byte for byte, ``ddpm generate --prompt P_k --seed K+j``, whatever else the file holds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

from pipelines.errors import UserError

MAX_WARNINGS = 10  # warning lines printed for a file; the rest are counted


@dataclass(frozen=True, eq=False)
class Prompts:
    """The prompts of a job: none (a class or unconditional model), one for every image (``--prompt``), or a file's
    (``--prompts``), prompt k for the images ``Plan.prompt_indices`` maps to k. ``negatives`` are row-aligned with
    ``prompts``; "" is no negative prompt (the empty prompt, what guidance pushes away from by default)."""

    kind: str = "none"  # none | one | file
    prompts: tuple[str, ...] = ()
    negatives: tuple[str, ...] = ()
    lines: tuple[int, ...] = ()  # file: the line each prompt is on, for messages

    @classmethod
    def none(cls) -> "Prompts":
        return cls()

    @classmethod
    def one(cls, prompt: str, negative: str | None = None) -> "Prompts":
        return cls("one", (prompt,), (negative or "",))

    def __len__(self) -> int:
        return len(self.prompts)

    def at(self, indices: Sequence[int]) -> tuple[list[str] | None, list[str] | None]:
        """(prompts, negative prompts) of the images whose prompt indices are ``indices``; (None, None) without
        prompts (``LoadedModel.condition`` then gives a text model the empty prompt)."""
        if self.kind == "none":
            return None, None
        if self.kind == "one":
            return [self.prompts[0]] * len(indices), [self.negatives[0]] * len(indices)
        return [self.prompts[k] for k in indices], [self.negatives[k] for k in indices]

    def representative(self) -> str | None:
        """What the per-request rules see for the whole job: a non-empty prompt if any (then guidance applies),
        else "" (all unconditional), or None without prompts."""
        if self.kind == "none":
            return None
        return next((p for p in self.prompts if p), "")

    def describe(self) -> dict | None:
        """job.json's "prompts": the prompt itself for one, a count and sha256 for a file (it may be long)."""
        if self.kind == "none":
            return None
        if self.kind == "one":
            return {"kind": "one", "prompt": self.prompts[0], "negative_prompt": self.negatives[0]}
        digest = hashlib.sha256(json.dumps([self.prompts, self.negatives], ensure_ascii=False).encode()).hexdigest()
        return {"kind": "file", "count": len(self.prompts), "sha256": digest}


def read_prompts(uri: str, guidance_scale: float, endpoint_url: str | None = None) -> Prompts:
    """``--prompts FILE`` (a local path or s3:// URI) -> Prompts, every prompt checked by ``ddpm.settings`` with
    ``guidance_scale``; a bad one is a UserError naming its line."""
    from ddpm.settings import SettingError, check_settings

    from pipelines import storage

    data = storage.read_bytes(uri, endpoint_url)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--prompts {uri}: not UTF-8 text (byte {exc.start})") from None
    rows = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not rows:
        raise UserError(f"--prompts {uri}: no prompts (one a line, or JSONL of {{\"prompt\": ...}})")
    jsonl = rows[0][1].lstrip().startswith("{")
    prompts, negatives = [], []
    for n, line in rows:
        where = f"--prompts {uri} line {n}"
        prompt, negative = _jsonl_row(line, where) if jsonl else (line, "")
        try:  # a prompt of "" is unconditional: guidance does not apply to it, nor a negative
            check_settings(prompt=prompt, negative_prompt=negative, guidance_scale=guidance_scale if prompt else 1.0)
        except SettingError as exc:
            raise UserError(f"{where}: {exc.field}: {exc.reason}") from None
        prompts.append(prompt)
        negatives.append(negative)
    return Prompts("file", tuple(prompts), tuple(negatives), tuple(n for n, _ in rows))


def _jsonl_row(line: str, where: str) -> tuple:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not JSON ({exc.msg}); a JSONL prompts file has one object a line") from None
    if not isinstance(row, dict) or "prompt" not in row:
        raise UserError(f"{where}: must be an object with a \"prompt\" (and optionally \"negative_prompt\")")
    unknown = sorted(set(row) - {"prompt", "negative_prompt"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; a row holds \"prompt\" and \"negative_prompt\"")
    negative = row.get("negative_prompt")
    return row["prompt"], "" if negative is None else negative


def prompt_warnings(tokenizer, prompts: Prompts, flag: str = "--prompt") -> list[str]:
    """One warning line per prompt (and negative prompt) that tokenizing cut or did not know
    (``ddpm.conditioning.describe``), at most ``MAX_WARNINGS`` then a count. ``tokenizer``: anything with
    ``report(prompts)`` and ``context_length`` (a ``ddpm.text`` tokenizer or TextEncoder)."""
    from ddpm.conditioning import describe

    if prompts.kind == "none":
        return []
    named = []  # (what to call it, text)
    for k, (p, n) in enumerate(zip(prompts.prompts, prompts.negatives)):
        where = f"{flag} line {prompts.lines[k]}" if prompts.kind == "file" else None
        named.append((f"{where}: prompt" if where else flag, p))
        if n:
            named.append((f"{where}: negative_prompt" if where else "--negative-prompt", n))
    reports = tokenizer.report([text for _, text in named])
    lines = [f"warning: {name}: {said}" for (name, _), report in zip(named, reports)
             if (said := describe(report, tokenizer.context_length))]
    if len(lines) > MAX_WARNINGS:
        lines = lines[:MAX_WARNINGS] + [f"warning: {len(lines) - MAX_WARNINGS} more prompts lost tokens or words"]
    return lines
