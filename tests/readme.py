"""The README's shell blocks as commands: each one run in order, in one shell (so that
variables and files carry over, as when a reader pastes them), with its own exit code
and output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
_MARK = "@@readme-command-done@@"


@dataclass
class Ran:
    command: str
    exit_code: int
    output: str

    def describe(self) -> str:
        return f"$ {self.command}\n(exit {self.exit_code})\n{self.output[-2000:]}"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def block(language: str, contains: str) -> str:
    return next(text for text in blocks(language) if contains in text)


def commands(text: str) -> list[str]:
    """The logical commands of a shell block: continued lines joined, a heredoc kept
    with its command, comments and blank lines left out."""
    found: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        command = [line]
        while command[-1].endswith("\\"):
            command.append(next(lines))
        heredoc = re.search(r"<<-?'?(\w+)'?", command[-1])
        if heredoc:
            for body in lines:
                command.append(body)
                if body.strip() == heredoc.group(1):
                    break
        found.append("\n".join(command))
    return found


def run_block(text: str, target: str, cwd: Path, timeout: float = 180, env: dict[str, str] | None = None) -> list[Ran]:
    """Runs each command of `text` against the server at `target` (the README's addresses
    replaced), with the dev install's tools first on PATH and `env` added."""
    for address in ("localhost:50051", "127.0.0.1:50051", "tally.example:50052"):
        text = text.replace(address, target)
    listed = commands(text)
    script = "".join(f'{command}\necho "{_MARK} $?"\n' for command in listed)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TALLY_TARGET": target, **(env or {})}
    result = subprocess.run(
        ["bash", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    outputs = re.split(rf"{_MARK} (\d+)\n", result.stdout)
    ran = [
        Ran(command, int(outputs[2 * i + 1]), outputs[2 * i])
        for i, command in enumerate(listed)
        if 2 * i + 1 < len(outputs)
    ]
    assert len(ran) == len(listed), f"the block stopped after {len(ran)} of {len(listed)} commands:\n{result.stdout}"
    return ran
