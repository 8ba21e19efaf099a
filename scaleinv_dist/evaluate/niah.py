"""Needle-in-a-haystack: build needle contexts from validation text and score retrieval.

Two tasks (NeedleBuilder(task=...)):
  magic_number (default)  the needle below, 7-digit values, optional distractor needles;
  passkey                 "The pass key is 48213. Remember it. 48213 is the pass key." with a
                          5-digit key, one needle per context, and the question
                          "What is the pass key? The pass key is" + " 48213".
With a tokenizer that splits numbers into digits (sentencepiece split_digits), a value is one
token per digit.

A magic-number needle is the sentence "The special magic <city> number is <7-digit number>." inserted into
haystack text (validation tokens) at a requested depth: the fraction of the haystack region that
precedes the needle's first token (0 = at the start, 1 = right before the question). Needles go
at sentence boundaries of the tokenized haystack when one is close (within 2% of the context),
else at the exact token. Optional distractor needles (other cities, other numbers) go at random
depths. The context ends with the question

    "What is the special magic <city> number? The special magic <city> number is" + " <number>"

and the answer is the number's tokens. The whole sequence is exactly `length` tokens.

Scoring:
  teacher-forced  the model reads the sequence once; a needle counts as retrieved when the argmax
                  at every answer position equals the answer token (exact match).
  generate        greedy decoding after the question (needs scaleinv_dist.generate); retrieved
                  when the decoded text starts with the number.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .common import autocast

CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Barcelona", "Beijing", "Berlin", "Bogota", "Boston",
    "Brussels", "Budapest", "Cairo", "Chicago", "Copenhagen", "Dublin", "Edinburgh", "Florence",
    "Geneva", "Hamburg", "Havana", "Helsinki", "Istanbul", "Jakarta", "Kyoto", "Lagos", "Lima",
    "Lisbon", "London", "Madrid", "Manila", "Melbourne", "Mexico", "Milan", "Montreal", "Moscow",
    "Mumbai", "Munich", "Nairobi", "Naples", "Oslo", "Paris", "Prague", "Quebec", "Riga", "Rome",
    "Santiago", "Seattle", "Seoul", "Shanghai", "Singapore", "Stockholm", "Sydney", "Taipei",
    "Tokyo", "Toronto", "Valencia", "Venice", "Vienna", "Warsaw", "Zurich", "Dakar",
)
SENTENCE_END = (".", "!", "?", ";", ":", "\n")


TASKS = ("magic_number", "passkey")
VALUE_DIGITS = {"magic_number": 7, "passkey": 5}
PASSKEY = "pass key"  # the passkey task's only key


def needle_text(key: str, value: str, task: str = "magic_number") -> str:
    if task == "passkey":
        return f"The {PASSKEY} is {value}. Remember it. {value} is the {PASSKEY}."
    return f"The special magic {key} number is {value}."


def question_text(key: str, task: str = "magic_number") -> str:
    if task == "passkey":
        return f"What is the {PASSKEY}? The {PASSKEY} is"
    return f"What is the special magic {key} number? The special magic {key} number is"


@dataclass
class NeedleExample:
    """One context of exactly `length` tokens; indices are token positions in `tokens`."""
    tokens: torch.Tensor  # (length,) int64: [bos] haystack-with-needles question answer
    length: int
    depth: float  # requested depth of the scored needle
    key: str
    value: str
    needle_start: int  # first token of the scored needle
    needle_len: int
    region_start: int  # first haystack token (after an optional BOS)
    region_end: int  # one past the last haystack/needle token (the question starts here)
    answer_start: int  # first answer token; the answer runs to the end of `tokens`
    distractors: list = field(default_factory=list)  # [(key, value, start)]

    @property
    def answer(self) -> torch.Tensor:
        return self.tokens[self.answer_start:]

    @property
    def actual_depth(self) -> float:
        """Where the needle landed: its start as a fraction of the room it could start in."""
        room = self.region_end - self.region_start - self.needle_len
        return (self.needle_start - self.region_start) / max(1, room)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["tokens"] = None
        d["actual_depth"] = self.actual_depth
        return d


class NeedleBuilder:
    """Builds NeedleExamples from a tokenizer and haystack token ids (1-D, validation text).

    haystack: concatenated validation documents' token ids (read cyclically when a context needs
    more than there is). bos_id: prepended when not None (match how windows were trained).
    task: "magic_number" or "passkey" (see the module docstring).
    """

    def __init__(self, tokenizer, haystack: np.ndarray | Sequence[int], *, bos_id: int | None = None,
                 seed: int = 0, snap_fraction: float = 0.02, task: str = "magic_number"):
        if task not in TASKS:
            raise ValueError(f"unknown needle task {task!r}; choose from {', '.join(TASKS)}")
        self.task = task
        self.tok = tokenizer
        self.haystack = np.asarray(haystack, dtype=np.int64).reshape(-1)
        if self.haystack.size < 16:
            raise ValueError(f"needle haystack has only {self.haystack.size} tokens; need validation text")
        self.bos_id = bos_id
        self.rng = np.random.default_rng(seed)
        self.snap_fraction = snap_fraction
        self._ends: dict[int, bool] = {}

    # -------------------------------------------------------------- tokens
    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)]

    def _ends_sentence(self, token: int) -> bool:
        if token not in self._ends:
            self._ends[token] = self.tok.decode([int(token)]).rstrip(" ").endswith(SENTENCE_END)
        return self._ends[token]

    def needle_tokens(self, key: str, value: str) -> list[int]:
        """The needle sentence with a leading space (it follows a sentence end in running text)."""
        return self._encode(" " + needle_text(key, value, self.task))

    def question_and_answer(self, key: str, value: str) -> tuple[list[int], list[int]]:
        """Question and answer tokens; together they encode ' ' + question + ' ' + value."""
        q = self._encode(" " + question_text(key, self.task))
        full = self._encode(" " + question_text(key, self.task) + " " + value)
        if full[:len(q)] == q and len(full) > len(q):
            return q, full[len(q):]
        return q, self._encode(value)

    def min_length(self, n_needles: int = 1) -> int:
        """A context length that fits n_needles needles, the question and a little haystack
        (computed with the longest city name, so every key fits)."""
        nines = "9" * VALUE_DIGITS[self.task]
        key = max(CITIES, key=lambda c: len(self.needle_tokens(c, nines)))
        q, a = self.question_and_answer(key, nines)
        head = 0 if self.bos_id is None else 1
        return head + n_needles * len(self.needle_tokens(key, nines)) + len(q) + len(a) + 8

    def random_value(self) -> str:
        """A value of VALUE_DIGITS[task] digits, the first not 0."""
        k = VALUE_DIGITS[self.task]
        return str(int(self.rng.integers(10 ** (k - 1), 10 ** k)))

    def _haystack_slice(self, n: int) -> np.ndarray:
        start = int(self.rng.integers(0, self.haystack.size))
        idx = (start + np.arange(n)) % self.haystack.size
        return self.haystack[idx]

    def _snap(self, hay: np.ndarray, target: int, lo: int, length: int) -> int:
        """The sentence boundary in hay nearest to target (within snap window, >= lo), else target."""
        window = max(1, int(self.snap_fraction * length))
        best = None
        for j in range(max(lo, target - window, 1), min(hay.size, target + window) + 1):
            closer = best is None or abs(j - target) < abs(best - target)
            if closer and self._ends_sentence(int(hay[j - 1])):
                best = j
        return max(lo, target if best is None else best)

    # -------------------------------------------------------------- build
    def build(self, length: int, depth: float, *, n_needles: int = 1, key: str | None = None,
              value: str | None = None) -> NeedleExample:
        """One example of exactly `length` tokens with the scored needle at `depth` in [0, 1]."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"needle depth must be in [0, 1], got {depth}")
        if self.task == "passkey" and n_needles != 1:
            raise ValueError("the passkey task has one needle per context (n_needles=1)")
        keys = list(self.rng.choice(len(CITIES), size=min(n_needles, len(CITIES)), replace=False))
        keys = [PASSKEY] if self.task == "passkey" else [CITIES[i] for i in keys]
        if key is not None:
            keys = [key] + [k for k in keys if k != key][:n_needles - 1]
        values = [value or self.random_value()] + [self.random_value() for _ in keys[1:]]
        needles = [self.needle_tokens(k, v) for k, v in zip(keys, values)]
        question, answer = self.question_and_answer(keys[0], values[0])
        head = [] if self.bos_id is None else [int(self.bos_id)]
        region = length - len(head) - len(question) - len(answer)
        n_hay = region - sum(len(n) for n in needles)
        if n_hay < 1:
            raise ValueError(f"context length {length} is too short for {n_needles} needle(s) and the "
                             f"question ({length - n_hay + 1} tokens needed)")
        # Work in haystack coordinates (insertion indices 0..n_hay, so needles never overlap): the
        # scored needle goes after the distractors drawn "before" it, at the index that puts its
        # first token at `depth` of the room it can start in.
        target = round(depth * (region - len(needles[0])))
        before = [i for i in range(1, len(needles)) if self.rng.uniform() < depth]
        after = [i for i in range(1, len(needles)) if i not in before]
        while before and target - sum(len(needles[i]) for i in before) < 0:
            after.append(before.pop())
        while after and target - sum(len(needles[i]) for i in before) > n_hay:
            before.append(after.pop())
        h0 = min(n_hay, max(0, target - sum(len(needles[i]) for i in before)))  # clamps only when tiny
        spots = [(int(self.rng.integers(0, h0 + 1)), 0, i) for i in before] + [(h0, 1, 0)]
        spots += [(int(self.rng.integers(h0, n_hay + 1)), 2, i) for i in after]
        spots.sort()
        hay = self._haystack_slice(n_hay)
        pieces, placed, cursor, offset = [], {}, 0, 0  # offset: needle tokens placed so far
        for k, (at, _, i) in enumerate(spots):
            upper = spots[k + 1][0] if k + 1 < len(spots) else n_hay
            at = min(upper, self._snap(hay, at, cursor, length))
            pieces += [hay[cursor:at], np.asarray(needles[i], dtype=np.int64)]
            placed[i] = len(head) + at + offset
            offset += len(needles[i])
            cursor = at
        pieces.append(hay[cursor:])
        body = np.concatenate(pieces)
        tokens = np.concatenate([np.asarray(head, dtype=np.int64), body,
                                 np.asarray(question + answer, dtype=np.int64)])
        assert tokens.size == length, (tokens.size, length)
        return NeedleExample(
            tokens=torch.from_numpy(tokens), length=length, depth=float(depth), key=keys[0],
            value=values[0], needle_start=placed[0], needle_len=len(needles[0]),
            region_start=len(head), region_end=len(head) + region, answer_start=length - len(answer),
            distractors=[(keys[i], values[i], placed[i]) for i in range(1, len(needles))])


# ----------------------------------------------------------------------------- scoring
def _answer_logits(model, tokens: torch.Tensor, starts: Sequence[int]) -> list[torch.Tensor]:
    """Logits predicting tokens[b, starts[b]:] for each row b: list of (n_answer, V) tensors."""
    inp = tokens[:, :-1]
    positions = torch.arange(inp.shape[1], device=tokens.device).expand_as(inp)
    doc_ids = torch.zeros_like(inp)
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        h = model.hidden_states(inp, positions, doc_ids)
        return [model.lm_head(h[b, s - 1:]).float() for b, s in enumerate(starts)]
    logits = model(inp, positions, doc_ids)
    return [logits[b, s - 1:].float() for b, s in enumerate(starts)]


@torch.no_grad()
def score_teacher_forced(model, examples: Sequence[NeedleExample], device="cpu", batch_size: int = 1,
                         progress: bool = False) -> list[bool]:
    """Exact match per example: argmax at every answer position equals the answer token."""
    device = torch.device(device)
    model.eval()
    hits = []
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="needles", unit="batch", leave=False, dynamic_ncols=True, disable=None)
    for group in batches:
        if len({e.length for e in group}) != 1:
            raise ValueError("examples in one batch must have the same length")
        tokens = torch.stack([e.tokens for e in group]).to(device)
        with autocast(device):
            logits = _answer_logits(model, tokens, [e.answer_start for e in group])
        for e, lg in zip(group, logits):
            hits.append(bool((lg.argmax(-1).cpu() == e.answer).all()))
    return hits


def generation_available() -> bool:
    try:
        from ..generate import generate  # noqa: F401
    except Exception:
        return False
    return True


@torch.no_grad()
def score_generate(model, examples: Sequence[NeedleExample], tokenizer, device="cpu", batch_size: int = 1,
                   progress: bool = False) -> list[bool]:
    """Greedy KV-cache decoding after the question (scaleinv_dist.generate); a hit when the decoded
    continuation, stripped, starts with the number."""
    from ..generate import generate

    model.eval()
    hits = []
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="needles (generate)", unit="batch", leave=False, dynamic_ncols=True,
                       disable=None)
    for group in batches:
        prompts = [e.tokens[:e.answer_start].tolist() for e in group]
        new = max(len(e.answer) for e in group) + 2
        with autocast(torch.device(device)):
            outs = generate(model, prompts, max_new_tokens=new, temperature=0.0)
        for e, out in zip(group, outs):
            hits.append(tokenizer.decode([int(t) for t in out]).strip().startswith(e.value))
    return hits


# ----------------------------------------------------------------------------- the grid
def run_grid(model, builder: NeedleBuilder, lengths: Sequence[int], depths: Sequence[float],
             samples: int, *, n_needles: int = 1, mode: str = "teacher", tokenizer=None,
             device="cpu", batch_size: int = 1, progress: bool = True) -> dict:
    """Accuracy for every (depth, length) cell over `samples` contexts each.

    Returns {"lengths", "depths", "accuracy": [[depth][length]], "hits", "samples", "examples"}.
    """
    acc = [[0.0] * len(lengths) for _ in depths]
    hits_grid = [[0] * len(lengths) for _ in depths]
    records = []
    for j, length in enumerate(lengths):
        examples = [builder.build(int(length), float(d), n_needles=n_needles)
                    for d in depths for _ in range(samples)]
        if mode == "generate":
            hits = score_generate(model, examples, tokenizer, device, batch_size, progress=progress)
        else:
            hits = score_teacher_forced(model, examples, device, batch_size, progress=progress)
        for i in range(len(depths)):
            cell = hits[i * samples:(i + 1) * samples]
            hits_grid[i][j] = int(sum(cell))
            acc[i][j] = sum(cell) / len(cell)
        for e, h in zip(examples, hits):
            records.append({"length": e.length, "depth": e.depth, "actual_depth": round(e.actual_depth, 4),
                            "key": e.key, "value": e.value, "hit": bool(h)})
    per_length = [sum(acc[i][j] for i in range(len(depths))) / len(depths) for j in range(len(lengths))]
    return {"lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths],
            "accuracy": acc, "hits": hits_grid, "samples": samples, "accuracy_by_length": per_length,
            "n_needles": n_needles, "mode": mode, "examples": records}
