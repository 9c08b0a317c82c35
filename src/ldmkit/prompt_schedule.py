"""Prompts that change during sampling, and prompts combined with AND, as AUTOMATIC1111 reads them.

- Prompt editing ``[from:to:when]`` (``from`` until step ``when``, then ``to``), ``[to:when]`` (nothing,
  then ``to``), ``[from::when]`` (``from``, then nothing). ``when`` with a decimal point is a fraction of the
  steps (``0.25``), without one a step number (``5``). Brackets nest.
- Alternation ``[a|b|c]``: ``a`` on step 1, ``b`` on step 2, ``c`` on step 3, ``a`` on step 4, ...
- ``a cat AND a dog :0.5`` (composable diffusion, Liu et al. 2022): each part is its own conditioning and
  guidance adds them up, ``uncond + cfg_scale * sum_i w_i * (cond_i - uncond)``.

A1111's semantics (``modules/prompt_parser.py``, ``modules/sd_samplers_cfg_denoiser.py``): a prompt becomes a
schedule ``[(end_at_step, text), ...]`` over the sampler's model calls (twice the steps for second-order
samplers), and the k-th call of the guided denoiser (k = 0, 1, ...) reads the first entry with
``k <= end_at_step``. A prompt the grammar cannot read (an unmatched ``|``, a trailing backslash) is used
as it is. Emphasis ``(word:1.2)`` and ``BREAK`` pass through to ``ldmkit.prompt`` untouched, per text.
Each distinct text is encoded once; a prompt with none of this syntax is encoded exactly as before.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldmkit.denoisers import CFGDenoiser, Conditioning, Denoiser, _sigma_batch
from ldmkit.prompt import _RE_NETWORK

# A1111 counts two model calls per step for these (SamplerData.total_steps with options["second_order"])
SECOND_ORDER = frozenset({"heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde_heun"})

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+", re.S)  # text without syntax characters; \x is a literal x
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")  # lark's SIGNED_NUMBER
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

# ---------------------------------------------------------------- the grammar
# A node is a str (literal text) or a tuple: ("seq", [nodes]), ("edit", before, after, when_text),
# ("alt", [nodes]).


class _NoParse(Exception):
    pass


class _Parser:
    """Recursive descent over A1111's schedule grammar. Inside brackets only the grammar's characters are
    allowed; at the top level a bracket or colon that starts no construct is literal text."""

    def __init__(self, text: str):
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def top(self) -> list:
        out: list = []
        while self.i < len(self.s):
            c = self.peek()
            if c in "([":
                start = self.i
                try:
                    out.append(self.group())
                    continue
                except _NoParse:
                    self.i = start
                out.append(c)
                self.i += 1
            elif c in "]):":
                out.append(c)
                self.i += 1
            else:
                out.append(self.item())  # "|" or a lone "\" make the whole prompt unreadable
        return out

    def item(self) -> Any:
        m = _PLAIN.match(self.s, self.i) or _WS.match(self.s, self.i)
        if not m:
            raise _NoParse
        self.i = m.end()
        return m.group()

    def prompt(self) -> tuple:
        """A sequence of text and constructs, up to one of ``] ) : |`` (or the end)."""
        out: list = []
        while self.i < len(self.s) and self.peek() not in "]):|":
            out.append(self.group() if self.peek() in "([" else self.item())
        return ("seq", out)

    def expect(self, c: str) -> None:
        if self.peek() != c:
            raise _NoParse
        self.i += 1

    def number(self) -> str | None:
        """`` NUMBER ]`` (optional whitespace around the number), consumed; None (nothing consumed) if absent."""
        m = re.compile(r"\s*(" + _NUMBER.pattern + r")\s*\]").match(self.s, self.i)
        if not m:
            return None
        self.i = m.end()
        return m.group(1)

    def group(self) -> Any:
        if self.peek() == "(":  # emphasis: kept as written (ldmkit.prompt weighs it), its inside still parsed
            self.i += 1
            first = self.prompt()
            if self.peek() == ":":
                self.i += 1
                second = self.prompt()
                self.expect(")")
                return ("seq", ["(", first, ":", second, ")"])
            self.expect(")")
            return ("seq", ["(", first, ")"])
        self.expect("[")
        first = self.prompt()
        c = self.peek()
        if c == "]":
            self.i += 1
            return ("seq", ["[", first, "]"])
        if c == "|":
            options = [first]
            while self.peek() == "|":
                self.i += 1
                options.append(self.prompt())
            self.expect("]")
            return ("alt", options)
        self.expect(":")
        when = self.number()
        if when is not None:  # [to:when]
            return ("edit", ("seq", []), first, when)
        second = self.prompt()
        self.expect(":")
        when = self.number()
        if when is None:
            raise _NoParse
        return ("edit", first, second, when)


def _parse(prompt: str) -> list | None:
    try:
        return _Parser(prompt).top()
    except _NoParse:
        return None


def _edit_step(when: str, steps: int, base: int | None) -> int:
    """The step ``[a:b:when]`` switches after. A hires pass (``base`` = the first pass's steps) counts on from
    the first pass: a fraction 1.5 is half-way through the hires steps, a step number base + 3 its third."""
    v = float(when)
    if "." in when:
        v = (v - (base is not None)) * steps
    elif base is not None:
        v -= base
    return min(steps, int(v))


def _collect(node: Any, steps: int, base: int | None, out: set[int]) -> None:
    if isinstance(node, str):
        return
    if node[0] == "edit":
        if (k := _edit_step(node[3], steps, base)) >= 1:
            out.add(k)
    elif node[0] == "alt":
        out.update(range(1, steps + 1))
    for n in node[1:3] if node[0] == "edit" else node[1]:
        _collect(n, steps, base, out)


def _text_at(node: Any, step: int, steps: int, base: int | None) -> str:
    if isinstance(node, str):
        return node
    if node[0] == "edit":
        return _text_at(node[1] if step <= _edit_step(node[3], steps, base) else node[2], step, steps, base)
    if node[0] == "alt":
        return _text_at(node[1][(step - 1) % len(node[1])], step, steps, base)
    return "".join(_text_at(n, step, steps, base) for n in node[1])


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(end_at_step, text), ...]``: ``text`` is the prompt through step ``end_at_step`` (A1111's
    ``get_learned_conditioning_prompt_schedules`` for one prompt). ``hires_steps``: the schedule of a hires
    fix's second pass of that many steps after a first pass of ``steps``."""
    base, n = (None, steps) if hires_steps is None else (steps, hires_steps)
    tree = _parse(prompt)
    if tree is None:
        return [(n, prompt)]
    ends: set[int] = {n}
    for node in tree:
        _collect(node, n, base, ends)
    root = ("seq", tree)
    return [(k, _text_at(root, k, n, base)) for k in sorted(ends)]


def split_and(prompt: str) -> list[tuple[str, float]]:
    """``a cat AND a dog :0.5`` -> ``[("a cat", 1.0), (" a dog", 0.5)]`` (A1111's ``get_multicond_prompt_list``)."""
    out = []
    for part in _AND.split(prompt):
        m = _WEIGHT.search(part)
        text, weight = m.groups() if m else (part, None)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


def total_steps(steps: int, sampler: str) -> int:
    """How many model calls A1111 schedules prompts over: twice the steps for a second-order sampler."""
    return steps * 2 if sampler in SECOND_ORDER else steps


# ---------------------------------------------------------------- conditioning that changes with the step

Schedule = tuple[tuple[int, int], ...]  # ((end_at_step, row of the table), ...)


@dataclass(frozen=True)
class PromptTable:
    """Every distinct text's conditioning (``table``, one row each) and which rows each image reads when.

    ``cond[i]``: image i's AND parts as ``(weight, schedule)``; ``uncond[i]``: its negative prompt's schedule.
    """

    table: Conditioning  # positives' rows
    neg_table: Conditioning  # negatives' rows
    cond: tuple[tuple[tuple[float, Schedule], ...], ...]
    uncond: tuple[Schedule, ...]

    @property
    def plain(self) -> bool:
        """One part of weight 1 per image: ordinary guidance with the conditioning of the step."""
        return all(len(parts) == 1 and parts[0][0] == 1.0 for parts in self.cond)


@dataclass(frozen=True)
class ScheduledConditioning(Conditioning):
    """A :class:`Conditioning` whose tensors are the first call's, plus the schedule of the others.

    ``core.guided_denoiser`` gives it to :class:`ScheduledCFGDenoiser`; ``replace(c_concat=...)`` keeps it."""

    prompts: PromptTable | None = None

    def expand(self, batch: int) -> ScheduledConditioning:
        plain = Conditioning(self.context, self.pooled, self.ids, self.c_concat).expand(batch)
        return dataclasses.replace(self, **{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})


def _pick(schedule: Schedule, call: int) -> int:
    """The row call ``call`` (0-based) reads: the first entry with ``call <= end_at_step`` (the last one
    past the end, where A1111 would fall back to the first)."""
    for end, row in schedule:
        if call <= end:
            return row
    return schedule[-1][1]


def _rows(c: Conditioning, idx: list[int]) -> Conditioning:
    take = torch.tensor(idx, device=c.context.device)
    return Conditioning(c.context[take], None if c.pooled is None else c.pooled[take],
                        None if c.ids is None else c.ids[take])


def _distinct(texts: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(dict.fromkeys(texts))}


Encoder = Callable[..., tuple[Conditioning, Conditioning]]  # (prompts, negatives[, cond_only=]) -> (cond, uncond)


def encode_scheduled(encode: Encoder, prompts: list[str], negatives: list[str], steps: int,
                     sampler: str, hires_steps: int | None = None, *,
                     cond_only: bool = False) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) for a batch whose prompts may use editing, alternation or AND.

    ``encode(prompts, negatives)`` is the model family's encoder (equal-length lists). Without any of the
    syntax this is ``encode(prompts, negatives)`` itself, bit for bit. ``hires_steps``: for a hires fix's
    second pass (A1111 schedules it after the first pass's ``steps``). ``cond_only``: guidance will not read
    the unconditional half (CFG scale 1): without the syntax it is ``encode(prompts, negatives,
    cond_only=True)``, which may skip encoding the negatives (AND still combines against them)."""
    n = total_steps(steps, sampler)
    hn = None if hires_steps is None else total_steps(hires_steps, sampler)
    parts = [[(text, w, prompt_schedule(text, n, hn)) for text, w in split_and(p)] for p in prompts]
    neg = [prompt_schedule(p, n, hn) for p in negatives]
    if all(len(ps) == 1 and ps[0][1] == 1.0 and len(ps[0][2]) == 1 for ps in parts) and all(len(s) == 1 for s in neg):
        # one text each all along: the prompt itself where there is no syntax (so encoded as before), else
        # its one text (e.g. "[a:b:0]", "a cat:1", or a hires pass after the switch)
        texts, negs = [ps[0][2][0][1] for ps in parts], [s[0][1] for s in neg]
        return encode(texts, negs, cond_only=True) if cond_only else encode(texts, negs)
    pos_rows = _distinct([t for ps in parts for _, _, s in ps for _, t in s])
    neg_rows = _distinct([t for s in neg for _, t in s])
    pos, negs = list(pos_rows), list(neg_rows)
    # the LoRA tags are read from the first text the encoder gets (A1111 takes them from the whole first
    # prompt before splitting it at AND): give it any the first prompt has elsewhere
    missing = [m.group(0) for m in _RE_NETWORK.finditer(prompts[0]) if m.group(0) not in pos[0]]
    encoded = [" ".join([pos[0], *missing]), *pos[1:]]
    size = max(len(pos), len(negs))  # the family encoders take lists of equal length: pad with repeats
    table, neg_table = encode(encoded + pos[-1:] * (size - len(pos)), negs + negs[-1:] * (size - len(negs)))
    table, neg_table = _rows(table, list(range(len(pos)))), _rows(neg_table, list(range(len(negs))))
    info = PromptTable(
        table, neg_table,
        tuple(tuple((w, tuple((end, pos_rows[t]) for end, t in s)) for _, w, s in ps) for ps in parts),
        tuple(tuple((end, neg_rows[t]) for end, t in s) for s in neg),
    )
    first = _rows(table, [pos_rows[ps[0][2][0][1]] for ps in parts])
    first_neg = _rows(neg_table, [neg_rows[s[0][1]] for s in neg])
    return (ScheduledConditioning(first.context, first.pooled, first.ids, prompts=info),
            ScheduledConditioning(first_neg.context, first_neg.pooled, first_neg.ids, prompts=info))


def scheduled(cond: Conditioning, uncond: Conditioning | None) -> bool:
    return isinstance(cond, ScheduledConditioning) or isinstance(uncond, ScheduledConditioning)


class ScheduledCFGDenoiser:
    """Classifier-free guidance whose conditioning is chosen per model call from a :class:`PromptTable`.

    Like A1111's ``CFGDenoiser`` it counts its calls (one instance per sampling run): call k reads each
    schedule's entry for k. One part of weight 1 per image is ordinary :class:`CFGDenoiser` guidance with
    that call's conditioning; AND parts are all denoised in one batch with the negative prompt and combined
    as ``uncond + sum_i (cond_i - uncond) * (w_i * scale)`` (A1111's ``combine_denoised``).
    """

    def __init__(self, denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, scale: float,
                 **kwargs: Any) -> None:
        info = next(c.prompts for c in (cond, uncond) if isinstance(c, ScheduledConditioning))
        assert info is not None
        self.denoiser, self.info, self.scale, self.kwargs = denoiser, info, float(scale), kwargs
        self.c_concat = cond.c_concat
        self.has_uncond = uncond is not None
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        k, info = self.calls, self.info
        self.calls += 1
        b = x.shape[0]
        if len(info.cond) not in (1, b):
            raise ValueError(f"prompt schedule has {len(info.cond)} images, the batch {b}")
        rows = list(range(b)) if len(info.cond) == b else [0] * b
        uncond = _rows(info.neg_table, [_pick(info.uncond[r], k) for r in rows]) if self.has_uncond else None
        if info.plain:
            cond = _rows(info.table, [_pick(info.cond[r][0][1], k) for r in rows])
            if self.c_concat is not None:
                cond = cond.replace(c_concat=self.c_concat)
                uncond = uncond.replace(c_concat=self.c_concat) if uncond is not None else None
            return CFGDenoiser(self.denoiser, cond, uncond, self.scale, **self.kwargs)(x, sigma)
        if uncond is None:
            raise ValueError("AND needs the unconditional (negative prompt) pass; this model guides without one")
        owner, weights, idx = [], [], []
        for i, r in enumerate(rows):
            for w, s in info.cond[r]:
                owner.append(i)
                weights.append(w)
                idx.append(_pick(s, k))
        parts = _rows(info.table, idx)
        if self.c_concat is not None:
            cc = self.c_concat.expand(b, *self.c_concat.shape[1:])
            uncond, parts = uncond.replace(c_concat=cc), parts.replace(c_concat=cc[owner])
        sigma = _sigma_batch(sigma, x)
        both = Conditioning.cat([uncond, parts])
        out = self.denoiser(torch.cat([x, x[owner]]), torch.cat([sigma, sigma[owner]]),
                            **both.unet_kwargs(), **self.kwargs)
        d_uncond, d_parts = out[:b], out[b:]
        den = d_uncond.clone()
        for j, (i, w) in enumerate(zip(owner, weights, strict=True)):
            den[i] += (d_parts[j] - d_uncond[i]) * (w * self.scale)
        return den
