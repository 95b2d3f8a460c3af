"""Ollama's Modelfile for a GGUF bundle: what `ollama create NAME -f Modelfile` reads, and what `gptflow publish`
sends to `/api/create` (https://github.com/ollama/ollama/blob/main/docs/modelfile.md).

A bundle's Modelfile names its GGUF (`FROM ./model.gguf`), the prompt format as a Go template (`TEMPLATE`), the end
tokens (`PARAMETER stop`), the context length (`num_ctx`: Ollama's default is longer than GPT-2's 1024 positions)
and the sampling defaults. The template is the model's own prompt frame, `before + {{ .Prompt }} + after`, then
`{{ .Response }}` and the text that ends the model's turn: Ollama renders earlier turns of a chat with their
responses filled in and cuts the last one at `{{ .Response }}`, so one frame serves `generate` and `chat`.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptflow.errors import GptflowError

MODELFILE = "Modelfile"
_INSTRUCTION = re.compile(r"^(FROM|TEMPLATE|PARAMETER|SYSTEM)\s+(.*)$", re.S)
# Parameters Ollama reads as numbers (the rest of what we write is `stop`, a string).
_NUMBERS = {"num_ctx": int, "top_k": int, "seed": int, "num_predict": int, "temperature": float, "top_p": float}
_NUMBERS |= {"repeat_penalty": float, "min_p": float}


class ModelfileError(GptflowError, ValueError):
    """A Modelfile gptflow cannot write or read."""


def go_literal(text: str) -> str:
    """`text` as literal output of a Go template (a `{{` in it would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def frame_template(before: str, after: str, end: str) -> str:
    """The Go template of a prompt frame: the text around the user's message, then the response and `end`, the
    text the model writes to close its turn (its end token, a chat template's end-of-turn and newline)."""
    return f"{go_literal(before)}{{{{ .Prompt }}}}{go_literal(after)}{{{{ .Response }}}}{go_literal(end)}"


@dataclass(frozen=True)
class Modelfile:
    """One model's Modelfile: `source` is the GGUF's file name beside it."""

    source: str
    template: str | None = None
    stops: tuple[str, ...] = ()
    parameters: dict[str, int | float] = field(default_factory=dict)
    system: str | None = None

    def text(self) -> str:
        lines = [f"FROM ./{self.source}"]
        if self.template is not None:
            if '"""' in self.template:
                raise ModelfileError('the prompt template holds """, which a Modelfile cannot quote')
            lines.append(f'TEMPLATE """{self.template}"""')
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        for stop in self.stops:
            lines.append(f"PARAMETER stop {_quote(stop)}")
        lines += [f"PARAMETER {name} {value}" for name, value in self.parameters.items()]
        return "\n".join(lines) + "\n"

    def create_parameters(self) -> dict[str, Any]:
        """The `parameters` of Ollama's `/api/create`: the numbers and the list of stops."""
        return {**self.parameters, **({"stop": list(self.stops)} if self.stops else {})}

    @classmethod
    def read(cls, path: str | Path) -> "Modelfile":
        """Parse a Modelfile gptflow wrote (FROM, TEMPLATE, SYSTEM, PARAMETER); anything else is a one-line error
        naming the file and the line."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelfileError(f"cannot read {path}: {exc.strerror or exc}") from None
        source, template, system, stops, parameters = None, None, None, [], {}
        for number, instruction, value in _instructions(text, path):
            where = f"{path}:{number}"
            if instruction == "FROM":
                source = value.removeprefix("./")
                if "/" in source or not source:
                    raise ModelfileError(f"{where}: FROM must name a file beside the Modelfile, not {value!r}")
            elif instruction in ("TEMPLATE", "SYSTEM"):
                if not (value.startswith('"""') and value.endswith('"""') and len(value) >= 6):
                    raise ModelfileError(f'{where}: {instruction} expects text in """triple quotes"""')
                template, system = (value[3:-3], system) if instruction == "TEMPLATE" else (template, value[3:-3])
            else:
                name, _, raw = value.partition(" ")
                if name == "stop":
                    stops.append(_unquote(raw.strip(), where))
                elif name in _NUMBERS:
                    try:
                        parameters[name] = _NUMBERS[name](raw.strip())
                    except ValueError:
                        raise ModelfileError(f"{where}: PARAMETER {name} expects a number, got {raw!r}") from None
                else:
                    raise ModelfileError(
                        f"{where}: unknown PARAMETER {name!r} (expected stop or {', '.join(_NUMBERS)})"
                    )
        if source is None:
            raise ModelfileError(f"{path}: no FROM line (expected FROM ./model.gguf)")
        return cls(source, template, tuple(stops), parameters, system)


def _instructions(text: str, path: Path):
    """(line number, instruction, value) per instruction; a triple-quoted value may span lines."""
    lines, number = text.splitlines(), 0
    while number < len(lines):
        line, start = lines[number], number + 1
        number += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _INSTRUCTION.match(line.strip())
        if match is None:
            raise ModelfileError(f"{path}:{start}: expected FROM, TEMPLATE, SYSTEM or PARAMETER, got {line[:60]!r}")
        instruction, value = match.groups()
        while value.startswith('"""') and (len(value) < 6 or not value.endswith('"""')) and number < len(lines):
            value += "\n" + lines[number]
            number += 1
        yield start, instruction, value


def _quote(text: str) -> str:
    if '"' in text or "\n" in text:
        raise ModelfileError(f"stop string {text!r} holds a quote or a newline, which a Modelfile cannot write")
    return f'"{text}"'


def _unquote(text: str, where: str) -> str:
    try:
        parts = shlex.split(text)
    except ValueError:
        parts = []
    if len(parts) != 1:
        raise ModelfileError(f'{where}: PARAMETER stop expects one "quoted" string, got {text!r}')
    return parts[0]
