"""Tests for esft.data: reading and validating JSONL, the reference template, chat-template
labelling, and both packers. Expected values are written out by hand."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest
import torch

from esft.data import (
    IGNORE_INDEX,
    Conversation,
    DataError,
    Message,
    PackingStats,
    TokenizedSample,
    collate_rows,
    format_chat_template,
    format_reference,
    iter_conversations,
    iter_packed_rows,
    iter_packed_rows_by_document,
    pack_samples,
    parse_record,
    read_conversations,
    tokenize_conversations,
)
from esft.testing import tiny_tokenizer

X = IGNORE_INDEX
BOS, EOS, PAD = 0, 1, 2


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def row(messages: list[dict], **extra) -> str:
    return json.dumps({"messages": messages, **extra})


USER_Q = {"role": "user", "content": "What is 12 plus 30?"}
ASSISTANT_A = {"role": "assistant", "content": "42."}
GOOD = row([USER_Q, ASSISTANT_A])


def conv(*turns: tuple[str, str] | tuple[str, str, bool]) -> Conversation:
    return Conversation(messages=tuple(Message(*turn) for turn in turns), source="test:1")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def test_reads_messages_prompt_response_and_ignores_other_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            row([USER_Q, ASSISTANT_A], id="a", length=60),
            "",
            "   ",
            json.dumps({"prompt": "Say hi", "response": "hi"}),
            row([USER_Q, {**ASSISTANT_A, "mask": 1}, USER_Q, {**ASSISTANT_A, "mask": 0}]),
        ],
    )
    conversations = read_conversations(path)
    assert [c.source for c in conversations] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert conversations[0].messages == (Message("user", "What is 12 plus 30?"), Message("assistant", "42."))
    assert conversations[1].messages == (Message("user", "Say hi"), Message("assistant", "hi"))
    assert [m.mask for m in conversations[2].messages] == [False, True, False, False]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"id": 3}), "missing 'messages'"),
    (json.dumps({"messages": "hello"}), "'messages' must be a list"),
    (json.dumps({"messages": []}), "'messages' is empty"),
    (row(["hello", ASSISTANT_A]), "messages[0]: expected an object"),
    (row([{"role": "robot", "content": "x"}, ASSISTANT_A]), "messages[0]: unknown role 'robot'"),
    (row([{"role": "system", "content": "be nice"}, USER_Q, ASSISTANT_A]), "role 'system' is not part"),
    (row([{"role": "user"}, ASSISTANT_A]), "messages[0]: missing 'content'"),
    (row([USER_Q, {"role": "assistant", "content": "  \n "}]), "messages[1]: 'content' is empty or whitespace"),
    (row([USER_Q, {"role": "assistant", "content": 42}]), "messages[1]: 'content' must be a string, got int"),
    (row([USER_Q, {**ASSISTANT_A, "mask": 2}]), "messages[1]: 'mask' must be 0 or 1, got 2"),
    (row([USER_Q, {**ASSISTANT_A, "mask": True}]), "'mask' must be 0 or 1, got True"),
    (row([USER_Q]), "no assistant turn"),
    (row([USER_Q, {**ASSISTANT_A, "mask": 1}]), "every assistant turn has mask=1"),
    (json.dumps({"prompt": "q"}), "missing 'response'"),
    (json.dumps({"prompt": "q", "response": ["a"]}), "'response' must be a string"),
]


@pytest.mark.parametrize("bad_line, fragment", BAD_LINES)
def test_each_malformed_line_is_reported_with_file_and_line(tmp_path, bad_line, fragment):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(DataError) as info:
        read_conversations(path)
    message = str(info.value)
    assert f"{path}:3: " in message
    assert fragment in message
    assert "1 invalid line(s) of 3" in message
    assert "skip_invalid=True" in message
    assert "\n" not in message


def test_parse_record_names_where_for_streamed_rows():
    with pytest.raises(DataError, match=r"^s3://bucket/part-0\.jsonl:17: messages\[0\]: unknown role 'bot'"):
        parse_record({"messages": [{"role": "bot", "content": "x"}]}, "s3://bucket/part-0.jsonl:17")
    assert isinstance(DataError("x"), ValueError)


def test_non_utf8_line_is_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not valid UTF-8"):
        read_conversations(path)


def test_summary_lists_first_five_errors_and_counts_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD] + ["{bad"] * 7)
    with pytest.raises(DataError) as info:
        read_conversations(path)
    message = str(info.value)
    assert "7 invalid line(s) of 8" in message
    assert [f"{path}:{n}: invalid JSON" in message for n in range(2, 9)] == [True] * 5 + [False] * 2
    assert "and 2 more" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    for skip_invalid in (False, True):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no training rows .*\"messages\"") as info:
            read_conversations(path, skip_invalid=skip_invalid)
        assert "\n" not in str(info.value)


def test_fully_invalid_file_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{bad", json.dumps({"id": 1})])
    for skip_invalid in (False, True):
        with pytest.raises(DataError, match=rf"^{re.escape(path)}: all 2 non-blank lines are invalid, "
                                            rf"first: {re.escape(path)}:1: invalid JSON"):
            read_conversations(path, skip_invalid=skip_invalid)


def test_skip_invalid_keeps_good_lines_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", ["{bad", GOOD, row([USER_Q]), GOOD])
    with caplog.at_level(logging.WARNING, logger="esft.data"):
        conversations = read_conversations(path, skip_invalid=True)
    assert [c.source for c in conversations] == [f"{path}:2", f"{path}:4"]
    assert f"{path}:1: invalid JSON" in caplog.text
    assert f"{path}:3: no assistant turn" in caplog.text


def test_iter_conversations_streams_valid_rows_before_raising(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, "{bad"])
    stream = iter_conversations(path)
    assert next(stream).source == f"{path}:1"
    with pytest.raises(DataError, match=re.escape(f"{path}:2")):
        next(stream)


def test_byte_order_mark_on_first_line_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert len(read_conversations(path)) == 1


# ---------------------------------------------------------------------------------------------
# Reference template
# ---------------------------------------------------------------------------------------------


def test_reference_single_turn_ids_and_labels(tok):
    sample = format_reference(conv(("user", "  What is 12 plus 30? \n"), ("assistant", "\n 42. \n\n")), tok)
    prompt = enc(tok, "User: What is 12 plus 30?\n\nAssistant:")
    answer = enc(tok, " 42.")
    assert sample.input_ids == [BOS] + prompt + answer + [EOS]
    assert sample.labels == [X] * (1 + len(prompt)) + answer + [EOS]
    assert tok.decode(sample.input_ids) == "<s>User: What is 12 plus 30?\n\nAssistant: 42.</s>"
    assert tok.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != X]) == " 42.</s>"


def test_reference_multi_turn_with_masked_assistant_turn(tok):
    sample = format_reference(
        conv(("user", "Hi"), ("assistant", "Hello", True), ("user", "Add 1 and 2"), ("assistant", "3")), tok
    )
    p1, a1 = enc(tok, "User: Hi\n\nAssistant:"), enc(tok, " Hello")
    p2, a2 = enc(tok, "User: Add 1 and 2\n\nAssistant:"), enc(tok, " 3")
    assert sample.input_ids == [BOS] + p1 + a1 + [EOS] + p2 + a2 + [EOS]
    assert sample.labels == [X] * (1 + len(p1) + len(a1) + 1 + len(p2)) + a2 + [EOS]
    assert tok.decode(sample.input_ids) == "<s>User: Hi\n\nAssistant: Hello</s>User: Add 1 and 2\n\nAssistant: 3</s>"
    assert sample.input_ids.count(BOS) == 1


def test_reference_multi_turn_both_answers_in_loss(tok):
    sample = format_reference(conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), tok)
    learned = [t for t, label in zip(sample.input_ids, sample.labels) if label != X]
    assert learned == enc(tok, " b") + [EOS] + enc(tok, " d") + [EOS]


def test_reference_needs_bos_and_eos(tok):
    no_bos = tiny_tokenizer()
    no_bos.bos_token = None
    with pytest.raises(ValueError, match="needs BOS and EOS"):
        format_reference(conv(("user", "q"), ("assistant", "a")), no_bos)


def test_prompt_response_row_formats_like_messages(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [json.dumps({"prompt": "Say hi", "response": "hi"}),
         row([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}])],
    )
    first, second = tokenize_conversations(read_conversations(path), tok)
    assert first.input_ids == second.input_ids == [BOS] + enc(tok, "User: Say hi\n\nAssistant:") + enc(tok, " hi") + [EOS]
    assert first.labels == second.labels


def test_tokenize_conversations_rejects_unknown_template(tok):
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        list(tokenize_conversations([conv(("user", "q"), ("assistant", "a"))], tok, template="alpaca"))


# ---------------------------------------------------------------------------------------------
# Chat template
# ---------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_template_labels_only_assistant_turns(chat_tok):
    sample = format_chat_template(
        conv(("user", "Hi "), ("assistant", "Hello", True), ("user", "Add 1 and 2"), ("assistant", " 3\n")), chat_tok
    )
    text = "<s><|user|>Hi<|assistant|>Hello</s><|user|>Add 1 and 2<|assistant|>3</s>"
    assert sample.input_ids == enc(chat_tok, text)
    prompt = enc(chat_tok, "<s><|user|>Hi<|assistant|>Hello</s><|user|>Add 1 and 2<|assistant|>")
    assert sample.labels == [X] * len(prompt) + sample.input_ids[len(prompt):]
    assert chat_tok.decode(sample.input_ids[len(prompt):]) == "3</s>"


def test_chat_template_both_turns_in_loss(chat_tok):
    sample = format_chat_template(conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")), chat_tok)
    learned = [t for t, label in zip(sample.input_ids, sample.labels) if label != X]
    assert chat_tok.decode(learned) == "b</s>d</s>"


def test_chat_template_missing_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="no chat template; use template='reference'"):
        list(tokenize_conversations([conv(("user", "q"), ("assistant", "a"))], tok, template="chat"))


def test_chat_template_that_rewrites_history_is_rejected():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages | reverse %}{{ m['content'] }};{% endfor %}"
    with pytest.raises(DataError, match="^test:1: the chat template renders earlier turns differently"):
        format_chat_template(conv(("user", "question"), ("assistant", "answer")), tokenizer)


# ---------------------------------------------------------------------------------------------
# Reference packing
# ---------------------------------------------------------------------------------------------

A = TokenizedSample([BOS, 11, 12, 13], [X, X, 12, 13])
B = TokenizedSample([BOS, 21, 22], [X, 21, 22])
C = TokenizedSample([BOS, 31, 32, 33, 34], [X, X, 32, 33, 34])
D = TokenizedSample([BOS, 41, 42], [X, X, 42])


def rows_as_tuples(rows):
    return [(r.input_ids, r.labels, r.attention_mask) for r in rows]


def test_reference_packing_hand_built_no_bos_drop():
    stats = PackingStats()
    rows = pack_samples([A, B, C, D], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.0, stats=stats)
    assert rows_as_tuples(rows) == [
        # C overflows with 1 slot left: only its last token is kept, its head is discarded.
        ([0, 11, 12, 13, 0, 21, 22, 34], [X, X, 12, 13, X, 21, 22, 34], [1] * 8),
        ([0, 41, 42, PAD, PAD, PAD, PAD, PAD], [X, X, 42, X, X, X, X, X], [1, 1, 1, 0, 0, 0, 0, 0]),
    ]
    assert stats == PackingStats(truncated=1, dropped=0, tokens_discarded=4)


def test_reference_packing_hand_built_always_drop_bos():
    rows = pack_samples([A, B, C, D], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=1.0)
    assert rows_as_tuples(rows) == [
        # B loses its BOS; C is cut to [33, 34], whose first token is not a BOS and is kept.
        ([0, 11, 12, 13, 21, 22, 33, 34], [X, X, 12, 13, 21, 22, 33, 34], [1] * 8),
        # D starts a row, so it keeps its BOS.
        ([0, 41, 42, PAD, PAD, PAD, PAD, PAD], [X, X, 42, X, X, X, X, X], [1, 1, 1, 0, 0, 0, 0, 0]),
    ]


def test_reference_packing_without_bos_id_never_drops():
    rows = pack_samples([A, B], 8, pad_id=PAD, bos_id=None, random_concat_ratio=1.0)
    assert rows[0].input_ids == [0, 11, 12, 13, 0, 21, 22, PAD]


def test_reference_packing_sample_longer_than_row_keeps_its_tail():
    long = TokenizedSample(list(range(100, 110)), [X] * 5 + list(range(105, 110)))
    rows = pack_samples([long, D], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.0)
    assert rows_as_tuples(rows) == [
        (list(range(102, 110)), [X, X, X] + list(range(105, 110)), [1] * 8),
        ([0, 41, 42] + [PAD] * 5, [X, X, 42] + [X] * 5, [1, 1, 1] + [0] * 5),
    ]


def test_reference_packing_exact_fill_adds_no_padding_row():
    rows = pack_samples([A, A], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.0)
    assert rows_as_tuples(rows) == [([0, 11, 12, 13, 0, 11, 12, 13], [X, X, 12, 13, X, X, 12, 13], [1] * 8)]
    assert pack_samples([], 8, pad_id=PAD, bos_id=BOS) == []


def three(i: int) -> TokenizedSample:
    return TokenizedSample([BOS, 10 * i + 1, 10 * i + 2], [X, 10 * i + 1, 10 * i + 2])


def test_bos_drop_follows_seeded_draws_for_non_first_samples_only():
    # random.Random(0) draws 0.844, 0.758, 0.421, 0.259, ...; ratio 0.5 drops on the 3rd and 4th.
    rows = pack_samples([three(i) for i in range(7)], 6, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.5, seed=0)
    assert [r.input_ids for r in rows] == [
        [0, 1, 2, 0, 11, 12],  # sample 1: draw 0.844, kept (sample 0 is first: no draw)
        [0, 21, 22, 0, 31, 32],  # sample 3: draw 0.758, kept
        [0, 41, 42, 51, 52, 62],  # sample 5: 0.421, BOS dropped; sample 6 cut to [62], 0.259 fires on no BOS
    ]


def test_bos_drop_matches_an_independent_seeded_stream():
    samples = [three(i) for i in range(40)]
    for seed in (0, 1, 7):
        draws = random.Random(seed)
        expected = list(samples[0].input_ids)
        for sample in samples[1:]:
            expected += sample.input_ids[1:] if draws.random() < 0.3 else sample.input_ids
        (only,) = pack_samples(samples, 200, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.3, seed=seed)
        assert only.input_ids == expected + [PAD] * (200 - len(expected))
    rows_by_seed = {
        seed: pack_samples(samples, 200, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.3, seed=seed)[0].input_ids
        for seed in (0, 1)
    }
    assert rows_by_seed[0] != rows_by_seed[1]


def random_samples(n: int, seed: int) -> list[TokenizedSample]:
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        body = [1000 * (i + 1) + k for k in range(rng.randint(1, 12))]
        samples.append(TokenizedSample([BOS] + body, [X] + body))
    return samples


def test_reference_rows_are_full_except_the_last():
    rows = list(iter_packed_rows(random_samples(60, 3), 16, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.2, seed=5))
    assert len(rows) > 3
    assert all(len(r.input_ids) == len(r.labels) == len(r.attention_mask) == 16 for r in rows)
    assert all(r.attention_mask == [1] * 16 for r in rows[:-1])
    last = rows[-1]
    real = sum(last.attention_mask)
    assert last.attention_mask == [1] * real + [0] * (16 - real)
    assert last.input_ids[real:] == [PAD] * (16 - real) and last.labels[real:] == [X] * (16 - real)


def test_packing_is_deterministic_for_a_seed():
    samples = random_samples(80, 4)
    for document_aware in (False, True):
        first = pack_samples(samples, 32, pad_id=PAD, bos_id=BOS, seed=11, document_aware=document_aware)
        second = pack_samples(list(samples), 32, pad_id=PAD, bos_id=BOS, seed=11, document_aware=document_aware)
        assert rows_as_tuples(first) == rows_as_tuples(second)


@pytest.mark.parametrize("kwargs, message",
                         [({"seq_length": 0}, "seq_length"), ({"random_concat_ratio": 1.5}, "random_concat_ratio")])
def test_packing_rejects_bad_arguments(kwargs, message):
    args = {"seq_length": 8, "random_concat_ratio": 0.2, **kwargs}
    for document_aware in (False, True):
        with pytest.raises(ValueError, match=message):
            pack_samples([A], pad_id=PAD, bos_id=BOS, document_aware=document_aware, **args)


# ---------------------------------------------------------------------------------------------
# Document-aware packing
# ---------------------------------------------------------------------------------------------


def test_document_packing_hand_built_no_bos_drop():
    rows = pack_samples([A, B, C, D], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.0, document_aware=True)
    assert rows_as_tuples(rows) == [
        # C (5 tokens) does not fit the 1 slot left, so this row is padded and C starts the next.
        ([0, 11, 12, 13, 0, 21, 22, PAD], [X, X, 12, 13, X, 21, 22, X], [1] * 7 + [0]),
        ([0, 31, 32, 33, 34, 0, 41, 42], [X, X, 32, 33, 34, X, X, 42], [1] * 8),
    ]


def test_document_packing_hand_built_always_drop_bos():
    rows = pack_samples([A, B, C, D], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=1.0, document_aware=True)
    assert rows_as_tuples(rows) == [
        ([0, 11, 12, 13, 21, 22, PAD, PAD], [X, X, 12, 13, 21, 22, X, X], [1] * 6 + [0, 0]),
        ([0, 31, 32, 33, 34, 41, 42, PAD], [X, X, 32, 33, 34, X, 42, X], [1] * 7 + [0]),
    ]


def test_document_packing_cuts_long_samples_from_the_right_and_drops_prompt_only_ones(caplog):
    long = TokenizedSample(list(range(100, 110)), [X, X] + list(range(102, 110)))
    prompt_only = TokenizedSample(list(range(200, 212)), [X] * 10 + [210, 211])
    stats = PackingStats()
    with caplog.at_level(logging.WARNING, logger="esft.data"):
        rows = list(
            iter_packed_rows_by_document(
                [long, prompt_only, D], 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.0, stats=stats
            )
        )
    assert rows_as_tuples(rows) == [
        (list(range(100, 108)), [X, X] + list(range(102, 108)), [1] * 8),
        ([0, 41, 42] + [PAD] * 5, [X, X, 42] + [X] * 5, [1, 1, 1] + [0] * 5),
    ]
    assert stats == PackingStats(truncated=1, dropped=1, tokens_discarded=2 + 12)
    assert "1 sample(s) longer than a row were cut, 1 dropped" in caplog.text


def test_document_packing_never_splits_a_sample():
    samples = random_samples(120, 9)
    rows = pack_samples(samples, 16, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.3, seed=2, document_aware=True)
    row_of = {}
    for index, packed in enumerate(rows):
        assert len(packed.input_ids) == 16
        real = sum(packed.attention_mask)
        assert packed.attention_mask == [1] * real + [0] * (16 - real)
        for token in packed.input_ids[:real]:
            if token >= 1000:
                row_of.setdefault(token // 1000, set()).add(index)
    assert sorted(row_of) == list(range(1, 121))
    assert all(len(indices) == 1 for indices in row_of.values())
    # Reading the rows back gives every sample whole and in order (some without their BOS).
    flat = [t for r in rows for t, m in zip(r.input_ids, r.attention_mask) if m]
    assert [t for t in flat if t != BOS] == [t for s in samples for t in s.input_ids[1:]]


def test_rows_stream_lazily_from_a_generator():
    consumed = []

    def generate():
        for sample in (A, A, B, B, B):
            consumed.append(sample)
            yield sample

    stream = iter_packed_rows(generate(), 8, pad_id=PAD, bos_id=BOS, random_concat_ratio=0.0)
    first = next(stream)
    assert first.input_ids == [0, 11, 12, 13, 0, 11, 12, 13]
    assert len(consumed) == 2


# ---------------------------------------------------------------------------------------------
# End to end and batching
# ---------------------------------------------------------------------------------------------


def test_file_to_batch(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 5)
    samples = list(tokenize_conversations(read_conversations(path), tok))
    length = len(samples[0].input_ids)
    rows = pack_samples(samples, 2 * length, pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, random_concat_ratio=0.0)
    batch = collate_rows(rows)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.shape == (3, 2 * length) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"][0].tolist() == samples[0].input_ids * 2
    assert batch["attention_mask"][2].tolist() == [1] * length + [0] * length
    assert batch["labels"][2, length:].tolist() == [X] * length


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        collate_rows([])


def test_tokenized_sample_lengths_must_match():
    with pytest.raises(ValueError, match="differ in length"):
        TokenizedSample([1, 2], [1])
