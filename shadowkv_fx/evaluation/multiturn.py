"""Multi-turn recall (issue #15): a fact from an early chat turn, asked for many turns later.

Turn 1 is a long document (the prompt ShadowKV compresses). Then ``turns`` user messages follow,
each a few hundred tokens of essay filler hiding one needle ("One of the special magic numbers for
KEY is: VALUE."), and the model replies to each. The conversation goes on through the same cache,
as transformers' multi-turn chat does: each later message enters the cache in one multi-token
forward, which is what ShadowKV's folding moves into the compressed store once it is older than the
fold window. A last message asks for the number of a needle given in the first half of the turns.

A sample is text only and a pure function of ``(index, seed, sizes)``; :func:`converse` runs one on
any model and cache (dense ``DynamicCache`` or ``ShadowKVCache``), on token ids.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..compat import CACHE_ARG
from .scoring import score_prediction
from .sources import haystack_units, make_key, make_value, needle_sentence
from .tasks import _fit, count_tokens, format_prompt, parse_length

TASK = "multiturn_recall"
# marks where the assistant's reply sits when the chat template renders a later user turn
_REPLY_MARK = "@@REPLY@@"


@dataclass(frozen=True)
class MultiTurnSample:
    """One conversation: the document prompt, the later user turns, and the expected answer.

    Attributes
    ----------
    prompt:
        Chat-formatted first turn (instruction + document), ending with the assistant header.
    turns:
        Later user turns as the text that follows the assistant's reply: it closes the reply, holds
        the user message and opens the next assistant reply (the last also holds ``answer_prefix``).
        ``turns[:-1]`` hide one needle each; ``turns[-1]`` asks the question.
    facts:
        ``(key, value)`` of the needle in each of ``turns[:-1]``.
    query_turn:
        Index in ``turns`` of the turn whose fact is asked (in the first half of the turns).
    references:
        The queried value (scored by string match, as the suite's needle tasks).
    doc_tokens, turn_tokens:
        Tokens of ``prompt`` and of each turn (``add_special_tokens=False``).
    reply_tokens, max_new_tokens:
        Decode budget of each intermediate reply and of the final answer.
    """

    task: str
    prompt: str
    turns: list[str]
    facts: list[tuple[str, str]]
    query_turn: int
    references: list[str]
    answer_prefix: str
    doc_tokens: int
    turn_tokens: list[int]
    reply_tokens: int
    max_new_tokens: int
    seed: int
    index: int

    @property
    def max_total_tokens(self) -> int:
        """Longest the conversation can get: prompt, turns and every reply at full length."""
        return self.doc_tokens + sum(self.turn_tokens) + len(self.turns) * self.reply_tokens + self.max_new_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def turn_text(tokenizer, body: str, answer_prefix: str = "") -> str:
    """What the chat template puts between an assistant reply's content and the next reply's.

    Rendered from a conversation with a marker as the assistant's content, so any template works;
    tokenizers without one get plain text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return f"\n{body}\n{answer_prefix}"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "-"}, {"role": "assistant", "content": _REPLY_MARK},
         {"role": "user", "content": body}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    return chat.split(_REPLY_MARK, 1)[1] + answer_prefix


def _document(seed: str, n: int) -> str:
    units = haystack_units("essay", random.Random(seed + "|document"), n, "word", "number", set(), set())
    return ("Below is a long document. Read it. In my next messages I will hide special magic numbers in more "
            "text; memorize them, I will quiz you about them at the end.\n\n" + " ".join(units))


def _fact_turn(seed: str, turn: int, fact: tuple[str, str], n: int) -> str:
    units = haystack_units("essay", random.Random(f"{seed}|turn{turn}"), n, "word", "number", set(), set())
    # the needle's place depends only on the turn, not on n, so sizing does not move it around
    depth = random.Random(f"{seed}|turn{turn}|depth").random()
    units.insert(round(depth * len(units)), needle_sentence(*fact, "number"))
    return ("More text follows.\n\n" + " ".join(units)
            + "\n\nRemember the special magic number in this message. Reply with a short acknowledgement.")


def make_multiturn_sample(tokenizer, doc_length: int | str = "3k", turns: int = 8, turn_length: int = 128,
                          index: int = 0, seed: int = 0, reply_tokens: int = 8,
                          max_new_tokens: int = 16) -> MultiTurnSample:
    """One conversation sized with ``tokenizer``: a ``doc_length``-token first turn, ``turns`` fact
    turns of at most ``turn_length`` tokens each, then the question.

    The same arguments always give the same sample.
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    doc_length = parse_length(doc_length)
    sample_seed = f"{TASK}|{doc_length}|{turns}|{turn_length}|{index}|{seed}"
    rng = random.Random(sample_seed)
    keys: set[str] = set()
    values: set[str] = set()
    facts = [(make_key(rng, "word", keys), make_value(rng, "number", values)) for _ in range(turns)]
    query_turn = rng.randrange(max(1, turns // 2))

    def doc_prompt(n: int) -> tuple[str]:
        return (format_prompt(tokenizer, _document(sample_seed, n), ""),)

    def fact_turn(t: int) -> Callable[[int], tuple[str]]:
        return lambda n: (turn_text(tokenizer, _fact_turn(sample_seed, t, facts[t], n)),)

    (prompt,) = _fit(doc_prompt, tokenizer, doc_length, 20.0)
    texts = [_fit(fact_turn(t), tokenizer, turn_length, 20.0)[0] for t in range(turns)]
    key, value = facts[query_turn]
    prefix = f"The special magic number for {key} mentioned in this conversation is"
    texts.append(turn_text(tokenizer, f"What is the special magic number for {key} mentioned in this conversation?",
                           prefix))
    return MultiTurnSample(
        task=TASK, prompt=prompt, turns=texts, facts=facts, query_turn=query_turn, references=[value],
        answer_prefix=prefix, doc_tokens=count_tokens(tokenizer, prompt),
        turn_tokens=[count_tokens(tokenizer, t) for t in texts], reply_tokens=reply_tokens,
        max_new_tokens=max_new_tokens, seed=seed, index=index,
    )  # fmt: skip


def make_multiturn_samples(tokenizer, num_samples: int, seed: int = 0, **sizes) -> list[MultiTurnSample]:
    """``num_samples`` conversations (indices ``0..num_samples-1``) of the same sizes."""
    return [make_multiturn_sample(tokenizer, index=i, seed=seed, **sizes) for i in range(num_samples)]


@dataclass
class Conversation:
    """What :func:`converse` returns.

    Attributes
    ----------
    replies:
        Each reply's ids, ``[1, n]`` (the prompt's first, the last one the answer).
    ids:
        The whole conversation, ``[1, S]``.
    logits:
        Per reply, its steps' logits (``[1, V]`` each) when ``output_logits=True`` was passed.
    """

    replies: list[torch.Tensor]
    ids: torch.Tensor
    logits: list[tuple[torch.Tensor, ...]]


@torch.no_grad()
def converse(model, prompt_ids: torch.Tensor, turn_ids: list[torch.Tensor], cache, reply_tokens: int,
             answer_tokens: int, eos_token_id: int | None = None,
             after_turn: Callable[[int, torch.Tensor], None] | None = None, **generate_kwargs) -> Conversation:
    """Greedy chat through one cache: reply to the prompt, then to each of ``turn_ids`` in turn.

    Each ``generate`` gets the whole conversation so far and the cache; the cache holds all of it
    but the last reply's last token, so only that token and the new turn go through the model, in
    one forward. A reply that ended with ``eos_token_id`` loses it (never cached): the turn's text
    closes the reply itself, as the chat template would.

    Args:
        prompt_ids: ``[1, S]``; turn_ids: ``[1, n_t]`` each.
        reply_tokens, answer_tokens: most new tokens of each reply and of the last one.
        after_turn: called after each reply with the turn number (0: the prompt's) and the
            conversation's ids so far.
    """
    ids = prompt_ids
    replies, logits = [], []
    for turn in range(len(turn_ids) + 1):
        if turn:
            if eos_token_id is not None and ids[0, -1].item() == eos_token_id:
                ids = ids[:, :-1]
            ids = torch.cat([ids, turn_ids[turn - 1].to(ids.device)], dim=1)
        new_tokens = answer_tokens if turn == len(turn_ids) else reply_tokens
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=eos_token_id, return_dict_in_generate=True, **{CACHE_ARG: cache},
                             **generate_kwargs)
        replies.append(out.sequences[:, ids.shape[1]:])
        logits.append(out.logits or ())
        ids = out.sequences
        if after_turn is not None:
            after_turn(turn, ids)
    return Conversation(replies, ids, logits)


def answered_turn(sample: MultiTurnSample, prediction: str) -> int | None:
    """Index of the fact turn whose value ``prediction`` names (the first one), else None: tells a
    wrong needle recalled from an answer that recalls none."""
    return next((t for t, (_, value) in enumerate(sample.facts) if value in prediction), None)


def run_multiturn_sample(model, tokenizer, sample: MultiTurnSample, cache,
                         after_turn: Callable[[int, torch.Tensor], None] | None = None) -> dict:
    """Hold ``sample``'s conversation with ``model`` through ``cache``; score the final answer.

    Returns ``prediction``, ``score``, ``answered_turn`` (:func:`answered_turn`), ``replies``
    (decoded intermediate replies) and ``context_tokens`` (the whole conversation).
    """
    device = next(model.parameters()).device

    def encode(text: str) -> torch.Tensor:
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chat = converse(model, encode(sample.prompt), [encode(t) for t in sample.turns], cache, sample.reply_tokens,
                    sample.max_new_tokens, eos_token_id=tokenizer.eos_token_id, after_turn=after_turn, pad_token_id=pad)
    texts = [tokenizer.decode(r[0], skip_special_tokens=True) for r in chat.replies]
    return {
        "prediction": texts[-1],
        "score": score_prediction(TASK, texts[-1], sample.references),
        "answered_turn": answered_turn(sample, texts[-1]),
        "replies": texts[:-1],
        "context_tokens": chat.ids.shape[1],
    }
