"""Conversation templates: one declarative table, one renderer, labels from spans.

Every template is a `TemplateSpec` row in `TEMPLATES`: a few format strings with ``{content}``
(the turn's text), ``{bos}`` / ``{eos}`` (the tokenizer's tokens, or ``<s>`` / ``</s>`` without a
tokenizer). One `Template` class renders all of them as *segments*: ``(text, supervised)`` pieces
whose concatenation is the rendered conversation. Only an assistant reply and its end-of-turn token
are supervised; system, user text, images, headers and separators never are. ``auto`` uses the
tokenizer's own ``chat_template`` and finds the assistant spans by rendering growing prefixes.

Rendered formats (pinned byte-for-byte in tests/test_templates.py). Sources: LLaVA's
``llava/conversation.py`` (conv_vicuna_v1, conv_llava_plain, conv_llama_2), the model cards and
chat templates of Llama-2-chat, Mistral-7B-Instruct-v0.1/v0.2, Qwen2 and Llama-3-Instruct.

* ``vicuna_v1`` (LLaVA-1.5, ``--version v1``): ``<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...``;
  default system "A chat between a curious user ..." (LLaVA's conv_vicuna_v1, not conv_llava_v1's
  "curious human" variant). Supervised: ``" {a}</s>"``.
* ``plain`` (stage 1): ``<s><image>{caption}</s>``. Like LLaVA's preprocess_plain the user text is
  dropped and only its ``<image>`` markers are kept; unlike LLaVA (which ends with its sep ``"\\n"``)
  the caption ends with the tokenizer's eos, so stage-1 models stop like every other template.
* ``llama_2``: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...``;
  no system block unless the conversation has one. Supervised: ``" {a} </s>"``.
* ``mistral_instruct`` (v0.1/v0.2 Hugging Face template spacing): ``<s>[INST] {q} [/INST]{a}</s>[INST] ...``;
  a system turn is prepended to the first user message followed by a blank line.
* ``chatml`` (Qwen, InternLM2): ``<|im_start|>{role}\\n{text}<|im_end|>\\n``; supervised
  ``{a}<|im_end|>``, the trailing ``"\\n"`` is scaffolding (the model stops at ``<|im_end|>``).
* ``llama3``: ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{text}<|eot_id|>``.

Contents are rendered verbatim (no ``strip``/``trim``), so that the supervised text is exactly the
data's answer. bos is part of the rendered *text*: tokenize renders with ``add_special_tokens=False``
(the Hugging Face chat-template convention), or use `llavakit.data.tokenize.encode_prompt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .conversation import IMAGE_MARKER, Turn

Segment = tuple[str, bool]  # (text, supervised)


@dataclass(frozen=True)
class TemplateSpec:
    """One row of the table. Format strings may use {content}, {bos} and {eos}."""

    user: str  # a user turn
    header: str  # before each assistant reply (and the generation prompt)
    reply: str  # the supervised part of an assistant turn: the answer and its end-of-turn token
    bos: str = ""  # once, at the very start
    system: str | None = None  # a stand-alone system block, or None
    system_in_user: str | None = None  # system text folded into the first user message, or None
    default_system: str | None = None  # used when the conversation has no system turn
    after_reply: str = ""  # unsupervised scaffolding after the end-of-turn token
    user_markers_only: bool = False  # keep only the <image> markers of user text (plain)
    stop: tuple[str, ...] = ("{eos}",)  # generation stops at any of these
    description: str = ""


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")

TEMPLATES: dict[str, TemplateSpec] = {
    "plain": TemplateSpec(
        bos="{bos}", user="{content}", header="", reply="{content}{eos}", user_markers_only=True,
        description="stage 1 (alignment): image then caption; only the caption and eos are supervised"),
    "vicuna_v1": TemplateSpec(
        bos="{bos}", system="{content} ", default_system=VICUNA_SYSTEM, user="USER: {content} ",
        header="ASSISTANT:", reply=" {content}{eos}",
        description="LLaVA-1.5 / Vicuna v1.1: 'USER: ... ASSISTANT: ...</s>'"),
    "llama_2": TemplateSpec(
        user="{bos}[INST] {content} [/INST]", system_in_user="<<SYS>>\n{content}\n<</SYS>>\n\n",
        header="", reply=" {content} {eos}", description="Llama-2-chat: '<s>[INST] ... [/INST] ... </s>'"),
    "mistral_instruct": TemplateSpec(
        bos="{bos}", user="[INST] {content} [/INST]", system_in_user="{content}\n\n", header="",
        reply="{content}{eos}", description="Mistral-Instruct v0.1/v0.2: '<s>[INST] ... [/INST]...</s>'"),
    "chatml": TemplateSpec(
        system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        header="<|im_start|>assistant\n", reply="{content}<|im_end|>", after_reply="\n",
        stop=("<|im_end|>",), description="ChatML (Qwen, InternLM2)"),
    "llama3": TemplateSpec(
        bos="<|begin_of_text|>", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        header="<|start_header_id|>assistant<|end_header_id|>\n\n", reply="{content}<|eot_id|>",
        stop=("<|eot_id|>",), description="Llama-3-Instruct"),
    "gemma": TemplateSpec(
        bos="{bos}", user="<start_of_turn>user\n{content}<end_of_turn>\n", system_in_user="{content}\n\n",
        header="<start_of_turn>model\n", reply="{content}<end_of_turn>", after_reply="\n",
        stop=("<end_of_turn>",), description="Gemma / Gemma-2 / Gemma-3 instruct (no system role: folded into "
                                              "the first user turn)"),
}
AUTO = "auto"  # the tokenizer's own chat_template


class TemplateError(ValueError):
    """A template cannot be built or cannot render the given turns."""


def _fill(fmt: str, content: str, bos: str, eos: str) -> str:
    # Placeholders of the *format* first, then split once on {content}: braces in data stay data.
    head, found, tail = fmt.replace("{bos}", bos).replace("{eos}", eos).partition("{content}")
    return head + content + tail if found else head


def _split_system(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
    for i, t in enumerate(turns):
        if t.role == "system" and i > 0:
            raise TemplateError(f"a system turn may only come first (found one at turn {i})")
        if t.role not in ("system", "user", "assistant"):
            raise TemplateError(f"turn {i} has role {t.role!r}; valid roles: system, user, assistant")
    if turns and turns[0].role == "system":
        return turns[0].content, list(turns[1:])
    return None, list(turns)


@dataclass
class Template:
    """A template bound to a tokenizer's bos/eos (see `get_template`)."""

    name: str
    spec: TemplateSpec | None  # None for ``auto``
    bos: str = "<s>"
    eos: str = "</s>"
    system: str | None = None  # overrides the spec's default system
    tokenizer: object = field(default=None, repr=False)

    # --- the one renderer -----------------------------------------------------------------------
    def turn_segments(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[list[Segment]]:
        """Segments grouped per turn: group 0 is the preamble (bos, system), then one group per
        user/assistant turn, then (optionally) the generation prompt."""
        if self.spec is None:
            if self.system is not None and not (turns and turns[0].role == "system"):
                turns = [Turn("system", self.system)] + list(turns)
            return _auto_turn_segments(self.tokenizer, turns, add_generation_prompt)
        s, bos, eos = self.spec, self.bos, self.eos
        system, rest = _split_system(turns)
        if system is None:
            system = self.system if self.system is not None else s.default_system
        pre: list[Segment] = [(_fill(s.bos, "", bos, eos), False)]
        if system is not None and s.system is not None:
            pre.append((_fill(s.system, system, bos, eos), False))
        groups = [pre]
        fold = system if s.system_in_user is not None else None
        for t in rest:
            if t.role == "user":
                text = IMAGE_MARKER * t.content.count(IMAGE_MARKER) if s.user_markers_only else t.content
                if fold is not None:
                    text, fold = _fill(s.system_in_user, system, bos, eos) + text, None
                groups.append([(_fill(s.user, text, bos, eos), False)])
            else:
                groups.append([(_fill(s.header, "", bos, eos), False), (_fill(s.reply, t.content, bos, eos), True),
                               (_fill(s.after_reply, "", bos, eos), False)])
        if add_generation_prompt:
            groups.append([(_fill(s.header, "", bos, eos), False)])
        return [[(x, sup) for x, sup in g if x] for g in groups]

    def segments(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        """Text pieces with a supervised flag, in order; their concatenation is `render`."""
        return [seg for g in self.turn_segments(turns, add_generation_prompt) for seg in g]

    def render(self, turns: list[Turn]) -> str:
        return "".join(x for x, _ in self.segments(turns))

    def render_prompt(self, turns: list[Turn]) -> str:
        """The conversation so far plus the assistant header: what generation continues from."""
        return "".join(x for x, _ in self.segments(turns, add_generation_prompt=True))

    @property
    def stop_strings(self) -> list[str]:
        """Strings at which generation ends (the end-of-turn token of a reply)."""
        if self.spec is None:
            return [self.eos] if self.eos else []
        return [_fill(x, "", self.bos, self.eos) for x in self.spec.stop]

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Ids of the stop strings that are single tokens (for ``generate(eos_token_id=...)``)."""
        ids = []
        for s in self.stop_strings:
            got = tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(got) == 1:
                ids.append(got[0])
        return ids


def get_template(name: str, tokenizer=None, system: str | None = None) -> Template:
    """Look a template up by exact name; ``tokenizer`` supplies bos/eos (and ``auto``'s template).

    ``system`` replaces the template's default system prompt (a system turn still wins).
    """
    if name == AUTO:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("template 'auto' needs a tokenizer with a chat_template; this tokenizer has "
                                f"none. Choose one of {sorted(TEMPLATES)} instead.")
        return Template(AUTO, None, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "",
                        system=system, tokenizer=tokenizer)
    if name not in TEMPLATES:
        raise TemplateError(f"unknown conversation template {name!r}; valid: {sorted(TEMPLATES) + [AUTO]}")
    bos, eos = _bos_eos(tokenizer)
    return Template(name, TEMPLATES[name], bos=bos, eos=eos, system=system, tokenizer=tokenizer)


def _bos_eos(tokenizer) -> tuple[str, str]:
    """The texts {bos} and {eos} stand for. bos only if the tokenizer itself starts texts with it
    (Llama/Mistral/Vicuna do, Qwen and GPT-2-style tokenizers do not), as LLaVA's ``tokenizer(prompt)``."""
    if tokenizer is None:
        return "<s>", "</s>"
    bos = tokenizer.bos_token or ""
    if bos:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        if not ids or ids[0] != tokenizer.bos_token_id:
            bos = ""
    return bos, tokenizer.eos_token or ""


# --- auto: the tokenizer's own chat template --------------------------------------------------------
def _auto_turn_segments(tokenizer, turns: list[Turn], add_generation_prompt: bool) -> list[list[Segment]]:
    """Render growing prefixes; each turn's text is the difference between consecutive renders.

    An assistant turn splits at the generation prompt (header, unsupervised) and after the first
    special token following the answer (its end-of-turn token). Templates whose renders are not
    prefix-stable (e.g. ones that rewrite earlier turns) cannot be split and raise `TemplateError`.
    """
    _split_system(turns)  # role checks
    msgs = [{"role": t.role, "content": t.content} for t in turns]

    def render(n: int, gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen)

    def tail(longer: str, shorter: str, what: str) -> str:
        if not longer.startswith(shorter):
            raise TemplateError(
                f"the tokenizer's chat_template is not prefix-stable ({what}), so assistant spans cannot be "
                "found; choose a built-in template instead: " + ", ".join(sorted(TEMPLATES)))
        return longer[len(shorter):]

    specials = _special_strings(tokenizer)
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    prev = render(first) if first else ""
    groups: list[list[Segment]] = [[(prev, False)]]
    for i in range(first, len(msgs)):
        full = render(i + 1)
        if msgs[i]["role"] != "assistant":
            groups.append([(tail(full, prev, f"turn {i}"), False)])
            prev = full
            continue
        header = tail(render(i, gen=True), prev, f"generation prompt before turn {i}")
        rest = tail(full, prev + header, f"assistant turn {i}")
        content = msgs[i]["content"]
        at = rest.find(content)
        if at < 0:
            raise TemplateError(f"the chat_template changes the text of assistant turn {i}, so its span cannot "
                                "be found; choose a built-in template instead")
        end = _end_of_turn(rest, at + len(content), specials)
        if end is None:
            raise TemplateError(f"no end-of-turn special token follows assistant turn {i} in the chat_template's "
                                "output, so the model could not learn to stop; choose a built-in template")
        groups.append([(header, False), (rest[:end], True), (rest[end:], False)])
        prev = full
    if add_generation_prompt:
        groups.append([(tail(render(len(msgs), gen=True), prev, "generation prompt"), False)])
    return [[(x, sup) for x, sup in g if x] for g in groups]


def _special_strings(tokenizer) -> list[str]:
    """Texts of the tokenizer's special tokens (not <image>), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    found.discard(IMAGE_MARKER)
    return sorted(found, key=len, reverse=True)


def _end_of_turn(text: str, start: int, specials: list[str]) -> int | None:
    """End index of the first special token after `start`, if only whitespace comes before it."""
    j = start
    while j < len(text) and text[j].isspace():
        j += 1
    for tok in specials:
        if tok and text.startswith(tok, j):
            return j + len(tok)
    return None


# --- export ------------------------------------------------------------------------------------------
# transformers' standard multimodal messages give `content` as a list of parts ({"type": "image"},
# {"type": "text", "text": ...}). Exported templates accept both spellings and turn parts into text as
# llavakit's `messages` reader does: an image part is the image marker, parts are joined by newlines.
CONTENT_TEXT_MACRO = (
    "{%- macro llavakit_text(c) -%}{%- if c is string or c is none -%}{{- c or '' -}}{%- else -%}"
    "{%- for p in c -%}{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if p['type'] == 'image' -%}{{- '" + IMAGE_MARKER + "' -}}"
    "{%- elif p['type'] == 'text' -%}{{- p['text'] -}}"
    "{%- else -%}{{- raise_exception('content part of type ' + p['type'] + ' is not supported') -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)


def multimodal_chat_template(template: str) -> str:
    """Wrap a text-only chat template (an LLM's own) so that it also accepts list-of-parts content: the
    messages are rewritten to text first (`CONTENT_TEXT_MACRO`), then `template` runs unchanged."""
    return (CONTENT_TEXT_MACRO
            + "{%- set llavakit_ns = namespace(items=[]) -%}{%- for m in messages -%}"
            "{%- if m['content'] is string -%}{%- set llavakit_ns.items = llavakit_ns.items + [m] -%}"
            "{%- else -%}{%- set llavakit_ns.items = llavakit_ns.items + [{'role': m['role'], "
            "'content': llavakit_text(m['content'])}] -%}{%- endif -%}{%- endfor -%}"
            "{%- set messages = llavakit_ns.items -%}" + template)


def jinja_chat_template(name: str, system: str | None = None, tokenizer=None) -> str:
    """A Jinja chat template (transformers' ``apply_chat_template`` convention) rendering exactly like
    `Template.render` / `render_prompt` for a built-in template; replies sit in ``{% generation %}``
    blocks so ``return_assistant_tokens_mask`` works too.

    With ``tokenizer`` the bos/eos texts `get_template` would use are written in as literals (exact for
    that tokenizer); without it the template uses the ``bos_token`` / ``eos_token`` variables."""
    if name not in TEMPLATES:
        raise TemplateError(f"no Jinja export for {name!r}; valid: {sorted(TEMPLATES)}")
    s = TEMPLATES[name]
    bos_expr, eos_expr = "(bos_token or '')", "(eos_token or '')"
    if tokenizer is not None:
        bos_expr, eos_expr = (json.dumps(x, ensure_ascii=False) for x in _bos_eos(tokenizer))

    def lit(fmt: str, content: str = "''") -> str:
        # A format string as a Jinja expression: literals joined with bos/eos/content expressions.
        parts, buf = [], ""
        i = 0
        while i < len(fmt):
            for key, expr in (("{bos}", bos_expr), ("{eos}", eos_expr),
                              ("{content}", content)):
                if fmt.startswith(key, i):
                    if buf:
                        parts.append(json.dumps(buf, ensure_ascii=False))
                    parts.append(expr)
                    buf, i = "", i + len(key)
                    break
            else:
                buf += fmt[i]
                i += 1
        if buf:
            parts.append(json.dumps(buf, ensure_ascii=False))
        return " + ".join(parts) if parts else "''"

    default = system if system is not None else s.default_system
    user_text = ("'" + IMAGE_MARKER + "' * (llavakit_text(m['content']).split('" + IMAGE_MARKER + "') | length - 1)"
                 if s.user_markers_only else "llavakit_text(m['content'])")
    out = [
        CONTENT_TEXT_MACRO,
        "{%- set ns = namespace(system=" + (json.dumps(default, ensure_ascii=False) if default is not None else "none")
        + ", fold=false) -%}",
        "{%- set msgs = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = llavakit_text(messages[0]['content']) -%}{%- set msgs = messages[1:] -%}{%- endif -%}",
        "{{- " + lit(s.bos) + " -}}",
    ]
    if s.system is not None:
        out.append("{%- if ns.system is not none -%}{{- " + lit(s.system, "ns.system") + " -}}{%- endif -%}")
    if s.system_in_user is not None:
        out.append("{%- set ns.fold = ns.system is not none -%}")
    out += [
        "{%- for m in msgs -%}",
        "{%- if m['role'] == 'user' -%}",
        "{%- set text = " + user_text + " -%}",
    ]
    if s.system_in_user is not None:
        out.append("{%- if ns.fold -%}{%- set text = " + lit(s.system_in_user, "ns.system")
                   + " + text -%}{%- set ns.fold = false -%}{%- endif -%}")
    out += [
        "{{- " + lit(s.user, "text") + " -}}",
        "{%- elif m['role'] == 'assistant' -%}",
        "{{- " + lit(s.header) + " -}}",
        "{%- generation -%}{{- " + lit(s.reply, "llavakit_text(m['content'])") + " -}}{%- endgeneration -%}",
        "{{- " + lit(s.after_reply) + " -}}",
        "{%- else -%}{{- raise_exception('role ' + m['role'] + ' is not supported here') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + lit(s.header) + " -}}{%- endif -%}",
    ]
    return "".join(out)
