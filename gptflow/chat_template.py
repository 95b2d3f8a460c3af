"""Chat templates rendered as transformers renders them (jinja2 in its sandbox), for a Hugging Face tokenizer.

The training side renders: instruction tuning, `generate`, responses, and the export, which keeps the prompt frame of
one user message rendered in the bundle (`chat_frame`) so that the edge runtime needs no jinja2. `ChatTokenizer` is
`edge.hf_tokenizer.HFTokenizer` plus rendering; `gptflow.tokenizer.model_tokenizer` gives it for a model with its
own tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from edge import BundleError
from edge.hf_tokenizer import HFTokenizer

REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # the first is the one templates read
# Stands for the user's message in the frame an export keeps: no template writes it, none trims or escapes it.
_MESSAGE = "\x00message\x00"


class ChatTemplateError(BundleError):
    """The model's chat template is broken, or refuses this conversation (its `raise_exception`)."""


def _plain(value: Any) -> Any:
    """`value` rebuilt from plain JSON types (as transformers does before rendering); other objects become `<Type>`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, int, float):  # a subclass (a str enum, numpy's str_) loses its methods and its own __str__
        if isinstance(value, kind):
            return getattr(kind, f"__{kind.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _chat_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages as the template sees them: plain dicts, None values dropped, reasoning under every name."""
    if not messages:
        raise ValueError("cannot render an empty conversation: give at least one message")
    chat = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages are dicts with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template in transformers' sandbox: trim_blocks, lstrip_blocks, loop controls, `{% generation %}`, its
    tojson/raise_exception/strftime_now/namespace. Cached: Jinja compiles a template into Python code."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it just renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates want plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """No underscore names, so a template cannot reach Python internals through a namespace."""

        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class Dict:
        """`dict(...)` and `dict.fromkeys(...)` without the type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=Dict(),
        namespace=Namespace,
    )
    return env.from_string(template)


class ChatTokenizer(HFTokenizer):
    """A Hub model's tokenizer with its chat templates rendered as transformers' `apply_chat_template` renders them."""

    def _template_for(self, tools: Any) -> str:
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if self._templates:
            names = ", ".join(sorted(self._templates))
            raise ChatTemplateError(f"this model has chat templates {names} but none named default")
        raise ChatTemplateError(
            "this model has no chat template: it was not trained for chat, so render its prompts as text"
        )

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text transformers' `apply_chat_template(messages, tokenize=False, ...)` gives. `kwargs` reach
        the template beside the special tokens (`enable_thinking=False` for Qwen3, `date_string` for Llama 3)."""
        template = self._template_for(tools)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools are JSON schemas (dicts); convert functions to schemas first")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TypeError("documents are dicts with 'title' and 'text' keys")
        chat = _chat_messages(messages)
        variables = _plain({**self.special_tokens, **kwargs})
        try:
            compiled = _compiled(template)
        except ImportError:
            raise
        except Exception as exc:  # jinja2's TemplateSyntaxError, without importing jinja2 here
            raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc
        try:
            return compiled.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as exc:  # raise_exception's TemplateError, or a template failing on unexpected input
            if type(exc).__name__ == "TemplateError":
                raise ChatTemplateError(f"the model's chat template refuses this conversation: {exc}") from exc
            raise ChatTemplateError(
                f"the model's chat template fails on this conversation: {type(exc).__name__}: {exc}"
            ) from exc

    def chat_ids(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of `render_chat(messages, **kwargs)`: the template writes the special tokens, so none are added
        (as transformers' `apply_chat_template(tokenize=True)`)."""
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)

    def chat_frame(self, **kwargs: Any) -> tuple[str, str]:
        """(before, after) the user's message in a one-message conversation with the assistant's turn opened: what
        an export bundle keeps, so the edge runtime frames a prompt as `before + message + after` without jinja2.
        The render is of this moment (a template that prints today's date prints the export's)."""
        text = self.render_chat([{"role": "user", "content": _MESSAGE}], add_generation_prompt=True, **kwargs)
        if text.count(_MESSAGE) != 1:
            raise ChatTemplateError(
                "the model's chat template changes the user's message: it cannot be kept as a frame"
            )
        before, after = text.split(_MESSAGE)
        return before, after
