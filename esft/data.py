"""Training data for ESFT: read JSONL conversations, format them into token ids with loss
labels, and pack them into fixed-length rows.

The stages are separate so that each can be reused on its own: a streaming caller (Ray Data)
maps `parse_record` over rows and `format_reference` over conversations, then feeds the
samples through `iter_packed_rows`, without ever holding the corpus in memory.

Formats and recipe follow the reference implementation (deepseek-ai/ESFT, `utils.py`,
ESFT-SPEC sections 4-5):

- A row is `{"messages": [{"role": "user"|"assistant", "content": str, "mask"?: 0|1}, ...]}`;
  an assistant turn with `"mask": 1` is context only. Rows with `"prompt"`/`"response"`
  strings are accepted as one user turn followed by one assistant turn.
- Template: `[BOS] "User: {q}\\n\\nAssistant:" " {a}" [EOS]`, each piece encoded on its own
  without special tokens and the ids concatenated; BOS only before the first message.
  Labels are -100 everywhere except on the answer tokens and the EOS of unmasked turns.
- Packing: greedy concatenation into rows of exactly `seq_length`; a sample that overflows
  the row keeps only its tail; a non-first sample of a row loses its leading BOS with
  probability `random_concat_ratio`; only the last row is padded.

Deviations from the reference are noted where they are made.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esft.errors import EsftError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` (and HF models) skip."""

ROLES = ("user", "assistant")
TEMPLATES = ("reference", "chat")

PROMPT_USER = "User: {input}\n\n"
PROMPT_ASSISTANT = "Assistant:"  # no trailing space: the answer piece carries it
ASSISTANT_RESPONSE = " {input}"

_ROW_HINT = (
    'one JSON object per line with "messages": [{"role": "user"|"assistant", "content": str}, ...] '
    '(or "prompt" and "response" strings)'
)
_ERRORS_SHOWN = 5


def _short(value: object) -> str:
    """A one-line, bounded repr of a user value for error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class DataError(EsftError):
    """A training file or row does not have the expected format, or the tokenizer cannot format it;
    the message says where."""


@dataclass(frozen=True)
class Message:
    """One turn. `mask=True` keeps an assistant turn out of the loss (user turns always are)."""

    role: str
    content: str
    mask: bool = False


@dataclass(frozen=True)
class Conversation:
    """A validated row; `source` (e.g. `train.jsonl:17`) lets later stages name it in errors."""

    messages: tuple[Message, ...]
    source: str


@dataclass(frozen=True)
class TokenizedSample:
    """One formatted conversation: token ids and per-token labels of the same length."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):  # a formatter's bug, not bad input: plain ValueError
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")


@dataclass(frozen=True)
class PackedRow:
    """One training row of exactly `seq_length` tokens; `attention_mask` is 0 on padding only
    (samples sharing a row attend to each other, as in the reference)."""

    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]


@dataclass
class PackingStats:
    """What packing threw away, filled in by the packers so a run can report it."""

    truncated: int = 0
    dropped: int = 0
    tokens_discarded: int = 0


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


def parse_record(obj: object, where: str) -> Conversation:
    """Validate one decoded JSON row and return its conversation.

    Raises DataError naming `where` (e.g. `train.jsonl:17`) so that a bad row in a large corpus
    can be found and fixed; used for both local files and streamed rows.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = _parse_messages(obj["messages"], where)
    elif "prompt" in obj or "response" in obj:
        messages = _parse_prompt_response(obj, where)
    else:
        raise DataError(f"{where}: missing 'messages' (or 'prompt' and 'response'); expected {_ROW_HINT}")
    assistant_turns = [m for m in messages if m.role == "assistant"]
    if not assistant_turns:
        raise DataError(f"{where}: no assistant turn; each row needs at least one assistant message to learn from")
    if all(m.mask for m in assistant_turns):
        raise DataError(f"{where}: every assistant turn has mask=1, so nothing in this row would be in the loss")
    return Conversation(messages=messages, source=where)


def _parse_messages(messages: object, where: str) -> tuple[Message, ...]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of turns, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: 'messages' is empty")
    return tuple(_parse_message(message, f"{where}: messages[{i}]") for i, message in enumerate(messages))


def _parse_message(message: object, where: str) -> Message:
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role == "system":
        raise DataError(f"{where}: role 'system' is not part of the reference template; fold it into the first user turn")
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {_short(role)}; expected 'user' or 'assistant'")
    content = _text_field(message, "content", where)
    mask = message.get("mask", 0)
    # bool is an int subclass: reject true/false so that the file says exactly 0 or 1.
    if isinstance(mask, bool) or mask not in (0, 1):
        raise DataError(f"{where}: 'mask' must be 0 or 1, got {_short(mask)}")
    return Message(role=role, content=content, mask=mask == 1)


def _parse_prompt_response(obj: dict, where: str) -> tuple[Message, ...]:
    prompt = _text_field(obj, "prompt", where)
    response = _text_field(obj, "response", where)
    return (Message("user", prompt), Message("assistant", response))


def _text_field(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: '{key}' is empty or whitespace")
    return value


def parse_line(line: str, where: str) -> Conversation | None:
    """Parse one JSONL line; None for a blank line (blank lines are allowed anywhere)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    return parse_record(obj, where)


def iter_conversations(path: str | os.PathLike, *, skip_invalid: bool = False) -> Iterator[Conversation]:
    """Stream the valid conversations of a JSONL file, in file order.

    Invalid lines are collected rather than raised one at a time, so one run reports every
    bad line: by default a single DataError listing them is raised after the last line (valid
    rows before it have been yielded); with `skip_invalid=True` they are logged and skipped.
    A file with no valid row is always an error.
    """
    errors: list[str] = []
    valid = 0
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{os.fspath(path)}:{lineno}"
            try:
                conversation = parse_line(_decode_line(raw, lineno, where), where)
            except DataError as err:
                errors.append(str(err))
                continue
            if conversation is not None:
                valid += 1
                yield conversation
    _check_corpus(os.fspath(path), valid, errors, skip_invalid)


def read_conversations(path: str | os.PathLike, *, skip_invalid: bool = False) -> list[Conversation]:
    """All valid conversations of a JSONL file; same error policy as `iter_conversations`."""
    return list(iter_conversations(path, skip_invalid=skip_invalid))


def _decode_line(raw: bytes, lineno: int, where: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 (byte {err.start})") from None
    # Editors on some platforms start files with a byte-order mark, which json.loads rejects.
    return text.removeprefix("\ufeff") if lineno == 1 else text


def _check_corpus(path: str, valid: int, errors: list[str], skip_invalid: bool) -> None:
    """Turn the errors collected over a file into one one-line DataError or warning."""
    if valid == 0 and not errors:
        raise DataError(f"{path}: no training rows (the file is empty or blank); write {_ROW_HINT}")
    if valid == 0:
        raise DataError(f"{path}: all {len(errors)} non-blank lines are invalid, first: {errors[0]}; write {_ROW_HINT}")
    if not errors:
        return
    shown = "; ".join(errors[:_ERRORS_SHOWN])
    more = f"; and {len(errors) - _ERRORS_SHOWN} more" if len(errors) > _ERRORS_SHOWN else ""
    summary = f"{path}: {len(errors)} invalid line(s) of {valid + len(errors)}: {shown}{more}"
    if not skip_invalid:
        # The message reaches CLI users too, who have no skip option: the fix comes first.
        raise DataError(f"{summary}; fix or delete these lines (in Python, read_conversations(..., skip_invalid=True) "
                        "skips them)")
    logger.warning("skipped %s", summary)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def format_reference(conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> TokenizedSample:
    """Format with the reference ESFT template, piece by piece as the reference does.

    Each user turn is encoded as one piece "User: {q}\\n\\nAssistant:" and each answer as
    " {a}" followed by EOS; encoding the pieces separately (not the whole string) keeps token
    boundaries identical to the reference. Deviation: the reference labels the leading BOS
    with its own id; we use -100, which only matters for a BOS in the middle of a packed row,
    where the reference would train the model to predict BOS after the previous EOS.
    """
    bos, eos = _special_ids(tokenizer)
    input_ids, labels = [bos], [IGNORE_INDEX]
    for message in conversation.messages:
        if message.role == "user":
            prompt = PROMPT_USER.format(input=message.content.strip()) + PROMPT_ASSISTANT
            piece = tokenizer.encode(prompt, add_special_tokens=False)
            in_loss = False
        else:
            answer = ASSISTANT_RESPONSE.format(input=message.content.strip())
            piece = tokenizer.encode(answer, add_special_tokens=False) + [eos]
            in_loss = not message.mask
        input_ids.extend(piece)
        labels.extend(piece if in_loss else [IGNORE_INDEX] * len(piece))
    return TokenizedSample(input_ids=input_ids, labels=labels)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DataError(
            f"the reference template needs BOS and EOS tokens; this tokenizer has bos_token_id={bos}, "
            f"eos_token_id={eos} (set them, or use template='chat')"
        )
    return bos, eos


def format_chat_template(conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> TokenizedSample:
    """Format with the tokenizer's own chat template; only assistant turns are in the loss.

    The template is rendered for growing prefixes of the conversation and the token ids are
    diffed, so each assistant turn's tokens (content plus whatever the template closes the
    turn with, e.g. an end-of-turn token) are labelled and everything else is -100. Contents
    are stripped, as in the reference template. Templates that rewrite earlier turns when a
    later one is added cannot be labelled this way and raise DataError.
    """
    if not tokenizer.chat_template:
        raise DataError("this tokenizer has no chat template; use template='reference' or set tokenizer.chat_template")
    messages = [{"role": m.role, "content": m.content.strip()} for m in conversation.messages]
    input_ids: list[int] = []
    labels: list[int] = []
    for end, message in enumerate(conversation.messages, start=1):
        if message.role != "assistant":
            continue
        prompt = _render_ids(tokenizer, messages[: end - 1], add_generation_prompt=True)
        _extend_with_suffix(input_ids, labels, prompt, in_loss=False, source=conversation.source)
        turn = _render_ids(tokenizer, messages[:end], add_generation_prompt=False)
        _extend_with_suffix(input_ids, labels, turn, in_loss=not message.mask, source=conversation.source)
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    _extend_with_suffix(input_ids, labels, full, in_loss=False, source=conversation.source)
    return TokenizedSample(input_ids=input_ids, labels=labels)


def _render_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The rendered text already holds the template's special tokens; add none of our own.
    return tokenizer.encode(text, add_special_tokens=False)


def _extend_with_suffix(
    input_ids: list[int], labels: list[int], rendered: list[int], in_loss: bool, source: str
) -> None:
    if rendered[: len(input_ids)] != input_ids:
        raise DataError(
            f"{source}: the chat template renders earlier turns differently once a later turn is added, "
            "so assistant tokens cannot be located; use template='reference'"
        )
    suffix = rendered[len(input_ids) :]
    input_ids.extend(suffix)
    labels.extend(suffix if in_loss else [IGNORE_INDEX] * len(suffix))


def tokenize_conversations(
    conversations: Iterable[Conversation], tokenizer: PreTrainedTokenizerBase, *, template: str = "reference"
) -> Iterator[TokenizedSample]:
    """Lazily format conversations with `template` ("reference" or "chat")."""
    if template not in TEMPLATES:
        raise EsftError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    formatter = format_reference if template == "reference" else format_chat_template
    for conversation in conversations:
        yield formatter(conversation, tokenizer)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def iter_packed_rows(
    samples: Iterable[TokenizedSample],
    seq_length: int,
    *,
    pad_id: int,
    bos_id: int | None,
    random_concat_ratio: float = 0.2,
    seed: int = 0,
    stats: PackingStats | None = None,
) -> Iterator[PackedRow]:
    """Stream rows packed as the reference packs them (`get_examples_from_buffer_pad`).

    Samples are appended in order; the one that overflows a row keeps only its last tokens
    (its head is discarded, not carried to the next row). For each sample that is not first
    in its row one draw of `random.Random(seed)` decides whether it loses its leading BOS,
    which is also where the reference draws (seeded the same way, it draws the same numbers).
    Only the final, partial row is padded.

    Deviations: (1) the reference drops the first token whenever the draw fires, even when the
    sample was just cut and that token is not a BOS, leaving the row one token short for the
    next sample's last token; we drop only a leading `bos_id` (None: never drop), so rows
    agree with the reference up to the first such event. (2) The reference always appends a
    final padded row, all padding when the samples fill their rows exactly; we never emit a
    row without tokens.
    """
    _check_packing_args(seq_length, random_concat_ratio)
    stats = stats if stats is not None else PackingStats()
    rng = random.Random(seed)
    input_ids: list[int] = []
    labels: list[int] = []
    for sample in samples:
        sample_ids, sample_labels = sample.input_ids, sample.labels
        room = seq_length - len(input_ids)
        if len(sample_ids) > room:
            stats.truncated += 1
            stats.tokens_discarded += len(sample_ids) - room
            sample_ids, sample_labels = sample_ids[-room:], sample_labels[-room:]
        if input_ids and _draw_drop_bos(rng, random_concat_ratio, sample_ids, bos_id):
            sample_ids, sample_labels = sample_ids[1:], sample_labels[1:]
        input_ids.extend(sample_ids)
        labels.extend(sample_labels)
        if len(input_ids) == seq_length:
            yield _padded_row(input_ids, labels, seq_length, pad_id)
            input_ids, labels = [], []
    if input_ids:
        yield _padded_row(input_ids, labels, seq_length, pad_id)


def iter_packed_rows_by_document(
    samples: Iterable[TokenizedSample],
    seq_length: int,
    *,
    pad_id: int,
    bos_id: int | None,
    random_concat_ratio: float = 0.2,
    seed: int = 0,
    stats: PackingStats | None = None,
) -> Iterator[PackedRow]:
    """Stream rows in which no sample is ever split across rows or cut mid-answer.

    A sample that does not fit the room left in the current row starts a new row, and the
    current row is padded. A sample longer than `seq_length` is cut from the right (keeping
    its prompt and the start of its answer) and counted in `stats.truncated`; if no loss token
    survives the cut it is dropped instead and counted in `stats.dropped`. BOS dropping follows
    `iter_packed_rows`, drawn after the sample is known to fit.
    """
    _check_packing_args(seq_length, random_concat_ratio)
    stats = stats if stats is not None else PackingStats()
    rng = random.Random(seed)
    input_ids: list[int] = []
    labels: list[int] = []
    for sample in samples:
        fitted = _fit_document(sample, seq_length, stats)
        if fitted is None:
            continue
        sample_ids, sample_labels = fitted
        if len(sample_ids) > seq_length - len(input_ids):
            yield _padded_row(input_ids, labels, seq_length, pad_id)
            input_ids, labels = [], []
        if input_ids and _draw_drop_bos(rng, random_concat_ratio, sample_ids, bos_id):
            sample_ids, sample_labels = sample_ids[1:], sample_labels[1:]
        input_ids.extend(sample_ids)
        labels.extend(sample_labels)
    if input_ids:
        yield _padded_row(input_ids, labels, seq_length, pad_id)
    if stats.truncated or stats.dropped:
        logger.warning(
            "document packing at seq_length=%d: %d sample(s) longer than a row were cut, %d dropped "
            "(no loss token left), %d token(s) discarded",
            seq_length, stats.truncated, stats.dropped, stats.tokens_discarded,
        )


def _fit_document(sample: TokenizedSample, seq_length: int, stats: PackingStats) -> tuple[list[int], list[int]] | None:
    """The sample cut to at most one row, or None when the cut leaves nothing to learn."""
    if len(sample.input_ids) <= seq_length:
        return sample.input_ids, sample.labels
    labels = sample.labels[:seq_length]
    if all(label == IGNORE_INDEX for label in labels):
        stats.dropped += 1
        stats.tokens_discarded += len(sample.input_ids)
        return None
    stats.truncated += 1
    stats.tokens_discarded += len(sample.input_ids) - seq_length
    return sample.input_ids[:seq_length], labels


def _draw_drop_bos(rng: random.Random, ratio: float, sample_ids: list[int], bos_id: int | None) -> bool:
    # Draw before looking at the sample so the random stream does not depend on its content.
    fired = rng.random() < ratio
    return fired and bos_id is not None and bool(sample_ids) and sample_ids[0] == bos_id


def _padded_row(input_ids: list[int], labels: list[int], seq_length: int, pad_id: int) -> PackedRow:
    padding = seq_length - len(input_ids)
    return PackedRow(
        input_ids=input_ids + [pad_id] * padding,
        labels=labels + [IGNORE_INDEX] * padding,
        attention_mask=[1] * len(input_ids) + [0] * padding,
    )


def _check_packing_args(seq_length: int, random_concat_ratio: float) -> None:
    if seq_length < 1:
        raise EsftError(f"seq_length must be positive, got {seq_length}")
    if not 0.0 <= random_concat_ratio <= 1.0:
        raise EsftError(f"random_concat_ratio must be in [0, 1], got {random_concat_ratio}")


def pack_samples(
    samples: Iterable[TokenizedSample],
    seq_length: int,
    *,
    pad_id: int,
    bos_id: int | None,
    random_concat_ratio: float = 0.2,
    seed: int = 0,
    document_aware: bool = False,
    stats: PackingStats | None = None,
) -> list[PackedRow]:
    """All packed rows as a list: reference packing, or document-aware with `document_aware`."""
    packer = iter_packed_rows_by_document if document_aware else iter_packed_rows
    return list(
        packer(
            samples, seq_length, pad_id=pad_id, bos_id=bos_id,
            random_concat_ratio=random_concat_ratio, seed=seed, stats=stats,
        )
    )


def collate_rows(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch of int64 tensors of shape (len(rows), seq_length)."""
    import torch  # here, not at the top: Ray workers that only tokenize and pack never need torch

    if not rows:  # a caller's bug (batches are slices of non-empty row lists): plain ValueError
        raise ValueError("cannot collate an empty batch")
    return {
        "input_ids": torch.tensor([row.input_ids for row in rows], dtype=torch.long),
        "labels": torch.tensor([row.labels for row in rows], dtype=torch.long),
        "attention_mask": torch.tensor([row.attention_mask for row in rows], dtype=torch.long),
    }
