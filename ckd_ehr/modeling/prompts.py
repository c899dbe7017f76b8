"""Teacher prompts and their tokenisation: the one way sample texts become teacher token ids
(training, validation, prediction, soft labels, EADF's text-fit report).

Prompt = the instruction (TeacherConfig.instruction: none by default, or the release's naming
the 25 phenotypes, or a short one) + the sample's text, wrapped in the tokenizer's chat
template where it has one, with the generation prompt added so the last token is the start of
the assistant turn (what `last` pooling reads). Over-long prompts lose instruction before input.
"""
from __future__ import annotations

from ckd_ehr.text import instruction
from ckd_ehr.modeling.paths import resolve_model_path


def load_tokenizer(tc):
    """The teacher's tokenizer (TeacherConfig `tc`: model, gguf_file), right padding."""
    # not at module level: transformers, loaded only when this runs
    from transformers import AutoTokenizer


    kwargs = {"gguf_file": tc.gguf_file} if tc.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(resolve_model_path(tc.model), **kwargs)
    tok.padding_side = "right"  # our collate pads itself; kept consistent for anyone else
    return tok


def _instruction_part(kind: str) -> str:
    text = instruction(kind)
    return f"{text}\n" if text else ""


def build_prompts(texts: list[str], tokenizer, use_chat_template: bool, instruction_kind: str = "paper") -> list[str]:
    """Instruction + input per text; through the chat template when asked and available."""
    instr = _instruction_part(instruction_kind)
    out = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for text in texts:
        content = f"{instr}{text}"
        if use_chat_template and has_template:
            content = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                    add_generation_prompt=True)
        out.append(content)
    return out


_MARK = "\u2063CKDEHR\u2063"  # placeholder located by string search only, never tokenised


def _template_parts(tokenizer, use_chat_template: bool, instruction_kind: str) -> tuple[str, str, str]:
    """(template prefix, instruction + separator, template suffix) around a sample's text."""
    full = build_prompts([_MARK], tokenizer, use_chat_template, instruction_kind)[0]
    head, suffix = full.split(_MARK)
    instr = _instruction_part(instruction_kind)
    assert head.endswith(instr)
    return head[: len(head) - len(instr)], instr, suffix


def encode_texts(texts: list[str], tokenizer, max_length: int, use_chat_template: bool = True,
                 instruction_kind: str = "paper") -> list[list[int]]:
    """Sample texts -> token ids (unpadded), exactly as the teacher trains and predicts.

    A prompt that fits is the tokenisation of build_prompts' string. An over-long one is
    rebuilt from its parts so that what carries information survives: the template's start
    and end (the end holds the assistant turn start that `last` pooling reads) stay whole,
    then the sample's text (its head, when even it alone does not fit), and the constant
    instruction gets whatever room is left (cut from its end)."""
    return _encode(texts, tokenizer, max_length, use_chat_template, instruction_kind, offsets=False)[0]


def encode_texts_with_offsets(texts: list[str], tokenizer, max_length: int, use_chat_template: bool = True,
                              instruction_kind: str = "paper") -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """encode_texts' ids and, per token, its (start, end) characters in the SAMPLE text ((0, 0)
    for the template's and the instruction's tokens): what maps teacher tokens to the text's
    clinical items (ckd_ehr.modeling.units). Needs a fast tokenizer (offset mapping)."""
    return _encode(texts, tokenizer, max_length, use_chat_template, instruction_kind, offsets=True)


def _encode(texts, tokenizer, max_length, use_chat_template, instruction_kind, offsets: bool):
    texts = list(texts)

    def enc(s):
        if not offsets:
            return tokenizer(s, add_special_tokens=False)["input_ids"], None
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: it has no offset mapping, so "
                             "teacher tokens cannot be mapped to the text's units; use a fast tokenizer")
        out = tokenizer(s, add_special_tokens=False, return_offsets_mapping=True)
        return out["input_ids"], out["offset_mapping"]

    prompts = build_prompts(texts, tokenizer, use_chat_template, instruction_kind)
    ids, offs = enc(prompts) if texts else ([], None)
    pre_s, instr_s, _ = _template_parts(tokenizer, use_chat_template, instruction_kind) if offsets and texts \
        else ("", "", "")
    parts = None
    out, out_offsets = [], []
    for i, (x, text) in enumerate(zip(ids, texts)):
        if len(x) <= max_length:
            out.append(x)
            if offsets:
                start = len(pre_s) + len(instr_s)
                if prompts[i][start:start + len(text)] != text:   # a template that rewrites content
                    start = prompts[i].find(text)
                out_offsets.append(_shift(offs[i], start, len(text)))
            continue
        if parts is None:
            parts = [enc(p)[0] for p in _template_parts(tokenizer, use_chat_template, instruction_kind)]
        pre, instr, suf = parts
        room = max_length - len(pre) - len(suf)
        if room <= 0:  # max_length shorter than the template itself: keep its end
            kept = (pre + suf)[-max_length:]
            out.append(kept)
            out_offsets.append([(0, 0)] * len(kept))
            continue
        body_ids, body_offsets = enc(text)
        body = body_ids[:room]
        head = pre + instr[: room - len(body)]
        out.append(head + body + suf)
        if offsets:
            out_offsets.append([(0, 0)] * len(head) + [tuple(o) for o in body_offsets[:room]] + [(0, 0)] * len(suf))
    return out, (out_offsets if offsets else None)


def _shift(offsets, start: int, length: int) -> list[tuple[int, int]]:
    """Prompt character offsets -> offsets in the sample text at `start` ((0, 0) outside it)."""
    res = []
    for s, e in offsets:
        s, e = max(s - start, 0), min(e - start, length)
        res.append((s, e) if e > s else (0, 0))
    return res
