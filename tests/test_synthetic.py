"""Synthetic task domains: determinism, splits, formats, and answers checked against rules
recomputed here independently of the generator."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from esft.demo import synthetic
from esft.metrics import score
from esft.demo.synthetic import (
    GENERAL,
    HELD_OUT_TASKS,
    INTENTS,
    LAW_LABELS,
    LAW_PHRASES,
    METRIC,
    PLURAL_SUFFIX,
    PRETRAIN_TASKS,
    TASKS,
    VELTISH,
    VERBS,
    RAW_GENERATORS,
    law_case,
    raw_documents,
    rows,
    split_of,
    write_corpus,
)

DOMAINS = (*TASKS, GENERAL)


def prompts(domain_rows: list[dict]) -> list[str]:
    return [row["messages"][0]["content"] for row in domain_rows]


def answers(domain_rows: list[dict]) -> list[str]:
    return [row["messages"][1]["content"] for row in domain_rows]


def test_task_lists_partition_the_tasks():
    assert set(METRIC) == set(TASKS)
    assert set(PRETRAIN_TASKS) | set(HELD_OUT_TASKS) == set(TASKS)
    assert not set(PRETRAIN_TASKS) & set(HELD_OUT_TASKS)


def test_rows_are_identical_in_another_process():
    # A different PYTHONHASHSEED changes the salted hash(); the rows must not depend on it. The child
    # registers `esft` as a bare namespace so that importing the generator skips esft/__init__ (and
    # torch): it needs only the standard library, and the test stays fast.
    program = ("import json, sys, types; package = types.ModuleType('esft'); package.__path__ = [sys.argv[1]]; "
               "sys.modules['esft'] = package; from esft.demo.synthetic import rows; "
               "print(json.dumps({d + s: rows(d, 40, seed=3, split=s) for d in sys.argv[2:] "
               "for s in ('train', 'eval')})); "
               "assert 'torch' not in sys.modules")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    child = subprocess.run([sys.executable, "-c", program, str(Path(synthetic.__file__).parent), *DOMAINS],
                           capture_output=True, text=True, env=env, check=True)
    here = {d + s: rows(d, 40, seed=3, split=s) for d in DOMAINS for s in ("train", "eval")}
    assert json.loads(child.stdout) == here


@pytest.mark.parametrize("domain", DOMAINS)
def test_longer_requests_extend_shorter_ones_and_seeds_differ(domain):
    for split in ("train", "eval"):
        assert rows(domain, 60, seed=1, split=split)[:25] == rows(domain, 25, seed=1, split=split)
    assert rows(domain, 0) == []
    assert prompts(rows(domain, 20, seed=1)) != prompts(rows(domain, 20, seed=2))


@pytest.mark.parametrize("domain", DOMAINS)
def test_eval_prompts_never_occur_in_train(domain):
    train = set(prompts(rows(domain, 3000, seed=0)))
    evaluation = prompts(rows(domain, 300, seed=0, split="eval"))
    assert not train & set(evaluation)
    # The eval split is a real sample of the domain, not a handful of repeated prompts.
    assert len(set(evaluation)) > 20


@pytest.mark.parametrize("domain", DOMAINS)
def test_rows_have_one_user_and_one_assistant_turn(domain):
    for row in rows(domain, 200, seed=4):
        assert list(row) == ["messages"] and len(row["messages"]) == 2
        user, assistant = row["messages"]
        assert list(user) == ["role", "content"] and list(assistant) == ["role", "content"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        for content in (user["content"], assistant["content"]):
            assert isinstance(content, str) and content.strip() == content and content
            assert content.isascii()  # files are the same bytes whatever the locale's encoding


@pytest.mark.parametrize("task", TASKS)
def test_answers_score_perfectly_and_other_rows_answers_score_lower(task):
    references = answers(rows(task, 40, seed=6))
    metric = METRIC[task]
    perfect = 100.0 if metric == "chrf" else 1.0
    assert score(references, [[a] for a in references], [metric])[metric] == pytest.approx(perfect)
    shifted = references[1:] + references[:1]
    assert score(shifted, [[a] for a in references], [metric])[metric] < perfect - 1e-6


def statute(facts: dict[str, bool]) -> str:
    """The statute as documented in `law_verdict`, written again here so the generator is checked
    against the rules rather than against itself."""
    if facts["consent"] or facts["claim_of_right"]:
        return "not guilty"
    if facts["force"]:
        return "guilty of robbery"
    if facts["from_home"]:
        return "guilty of burglary"
    if facts["intent_to_return"]:
        return "guilty of unauthorized use"
    return "guilty of theft"


def facts_stated_in(prompt: str) -> dict[str, bool]:
    facts = {}
    for fact, (false_phrases, true_phrases) in LAW_PHRASES.items():
        found = [held for held, phrases in ((False, false_phrases), (True, true_phrases))
                 for phrase in phrases if phrase in prompt]
        assert len(found) == 1, (fact, prompt)  # every fact stated exactly once, unambiguously
        facts[fact] = found[0]
    return facts


def test_law_verdicts_follow_the_statute():
    law_rows = rows("law", 1000, seed=2)
    verdicts = Counter()
    for prompt, verdict in zip(prompts(law_rows), answers(law_rows)):
        assert verdict == statute(facts_stated_in(prompt))
        verdicts[verdict] += 1
    assert set(verdicts) == set(LAW_LABELS)
    assert min(verdicts.values()) > 0.08 * len(law_rows)  # no label is a rare afterthought
    for index in range(200):
        facts, prompt, verdict = law_case(random.Random(index))
        assert facts_stated_in(prompt) == facts and verdict == statute(facts)


def test_math_answers_are_worked_correctly_from_the_prompt_numbers():
    equation = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
    operations, step_counts, operands = Counter(), Counter(), []
    for prompt, answer in zip(prompts(math_rows := rows("math", 1000, seed=3)), answers(math_rows)):
        steps = equation.findall(answer)
        assert steps and answer.endswith(f" The answer is {steps[-1][3]}.")
        leaves, previous = [], None
        for left, op, right, result in steps:
            expected = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[op]
            assert int(result) == expected >= 0, answer
            # A later step starts from the previous result; only the first step's left side is given.
            if previous is None:
                leaves.append(int(left))
            else:
                assert left == previous
            leaves.append(int(right))
            previous = result
            operations[op] += 1
        assert Counter(int(n) for n in re.findall(r"\d+", prompt)) == Counter(leaves), (prompt, answer)
        operands += leaves
        step_counts[len(steps)] += 1
    assert set(operations) == {"+", "-", "*"} and set(step_counts) == {1, 2}
    assert min(operands) >= 1 and sum(n <= 20 for n in operands) > 0.9 * len(operands)  # small numbers, mostly


def printed_by(program: str) -> str:
    """Run a generated program with only `print` and `len` available, and return what it prints."""
    printed: list[str] = []

    def capture(*values: object) -> None:
        printed.append(" ".join(map(str, values)))

    # The programs are ours, built from fixed word lists, so exec is safe here.
    exec(program, {"__builtins__": {"len": len, "print": capture}})  # noqa: S102
    return "\n".join(printed)


def test_code_outputs_are_what_the_programs_print():
    kinds = Counter()
    for prompt, output in zip(prompts(code_rows := rows("code", 1000, seed=4)), answers(code_rows)):
        header, program = prompt.split("\n", 1)
        assert header == "What does this program print?"
        assert printed_by(program) == output, program
        kinds["arithmetic" if output.isdigit() and '"' not in program else "string"] += 1
    assert min(kinds.values()) > 300  # both kinds of program are common


def test_intent_answers_are_json_with_slots_from_the_utterance():
    intents = Counter()
    for prompt, answer in zip(prompts(intent_rows := rows("intent", 1000, seed=5)), answers(intent_rows)):
        parsed = json.loads(answer)
        assert answer == json.dumps(parsed) and list(parsed) == ["intent", "slots"]
        slot_order = INTENTS[parsed["intent"]][0]
        assert list(parsed["slots"]) == [slot for slot in slot_order if slot in parsed["slots"]]
        utterance = prompt.removeprefix("Extract the intent and slots: ")
        assert all(value in utterance for value in parsed["slots"].values())
        intents[parsed["intent"]] += 1
    assert set(intents) == set(INTENTS)


def test_translation_is_one_consistent_word_mapping():
    words = list(VELTISH.values())
    assert len(set(words)) == len(words)  # bijective
    assert not set(words) & set(VELTISH)  # no invented word is one of the English words
    stems = {word: lemma for lemma, word in VELTISH.items()}
    veltish_of_surface: dict[str, set[str]] = {}
    for prompt, answer in zip(prompts(pairs := rows("translation", 1500, seed=6)), answers(pairs)):
        english = prompt.removeprefix("Translate to Veltish: ").removesuffix(".").split()
        veltish = answer.split()  # Veltish writes no final full stop
        for token in veltish:  # every Veltish word is a lexicon word, perhaps with the plural suffix
            assert token in stems or token.removesuffix(PLURAL_SUFFIX) in stems, (token, answer)
        for token in english:
            if token in VELTISH:
                assert VELTISH[token] in veltish, (token, prompt, answer)
            if token not in ("a", "an"):  # the indefinite article has no Veltish word
                # The same English word always comes out as the same Veltish word.
                veltish_of_surface[token] = veltish_of_surface.get(token, set(veltish)) & set(veltish)
        assert stems[veltish[-1]] in VERBS  # verb-final
    assert all(veltish_of_surface.values()), {k for k, v in veltish_of_surface.items() if not v}


def test_summaries_name_facts_from_the_passage():
    for prompt, summary in zip(prompts(summary_rows := rows("summary", 500, seed=7)), answers(summary_rows)):
        passage = prompt.removeprefix("Summarize: ")
        assert 4 <= passage.count(". ") + 1 <= 6
        who_and_event, town_day = summary.removesuffix(".").rsplit(" in ", 1)
        town, day = town_day.split(" on ")
        assert who_and_event in passage and town in passage and day in passage


def test_general_rows_avoid_held_out_formats_but_use_numbers_and_symbols():
    text = "\n".join(m["content"] for row in rows(GENERAL, 2000, seed=8) for m in row["messages"])
    for marker in ("The answer is", "print(", "Veltish", "Translate"):
        assert marker not in text
    for symbol in '()":=*-,$':
        assert symbol in text
    assert len(set(re.findall(r"\d+", text))) > 50 and len(set(re.findall(r"[a-z]+", text))) > 400


def test_write_corpus_is_byte_identical_and_matches_rows(tmp_path):
    first = write_corpus(tmp_path / "a", seed=9, train_rows=30, eval_rows=10, general_rows=40)
    second = write_corpus(tmp_path / "b", seed=9, train_rows=30, eval_rows=10, general_rows=40)
    assert set(first) == set(DOMAINS) and all(set(paths) == {"train", "eval"} for paths in first.values())
    for domain, paths in first.items():
        for split, path in paths.items():
            assert path == tmp_path / "a" / domain / f"{split}.jsonl"
            assert path.read_bytes() == second[domain][split].read_bytes()
            lines = path.read_text(encoding="utf-8").splitlines()
            expected_count = {"train": 40 if domain == GENERAL else 30, "eval": 10}[split]
            assert [json.loads(line) for line in lines] == rows(domain, expected_count, seed=9, split=split)
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.endswith(".tmp")]


def test_bad_requests_raise():
    with pytest.raises(ValueError, match="unknown domain 'poetry'.*math"):
        rows("poetry", 3)
    with pytest.raises(ValueError, match="n must be >= 0"):
        rows("math", -1)
    with pytest.raises(ValueError, match="unknown split"):
        rows("math", 3, split="test")


# --- raw pretraining text ---------------------------------------------------------------------


def test_every_task_has_raw_text_outside_the_instruction_template():
    assert set(RAW_GENERATORS) == set(TASKS)
    for task in TASKS:
        documents = raw_documents(task, 300, seed=1)
        assert len(documents) == 300 and len(set(documents)) > 150  # varied, not one line repeated
        assert raw_documents(task, 120, seed=1) == documents[:120]  # a longer request extends a shorter one
        assert raw_documents(task, 50, seed=2) != documents[:50]
        for document in documents:
            assert "User:" not in document and "Assistant:" not in document
            assert "Translate to Veltish" not in document and "What does this program print?" not in document
            assert document.isascii()
    with pytest.raises(ValueError, match="no raw text for domain 'general'"):
        raw_documents(GENERAL, 1)


def test_math_exercises_are_train_problems_with_correct_working():
    exercises = [d for d in raw_documents("math", 400, seed=6) if d.startswith("Exercise ")]
    assert len(exercises) > 50
    for exercise in exercises:
        question, working = exercise.split("\n")
        assert split_of(question.split(". ", 1)[1]) == "train"  # never an eval prompt
        result = working.rsplit("Result: ", 1)[1].removesuffix(".")
        assert working.split("; ")[-1].split(" = ")[1].startswith(result)


def test_math_solutions_are_train_problems_answered_in_the_task_style():
    solutions = [d for d in raw_documents("math", 400, seed=7) if "\nSolution: " in d]
    assert len(solutions) > 50
    for document in solutions:
        heading, answer = document.split("\nSolution: ")
        question = heading.split(": ", 1)[1]
        assert split_of(question) == "train"  # never an eval prompt
        assert re.fullmatch(r"(\d+ [-+*] \d+ = \d+\. )+The answer is \d+\.", answer)


def test_math_worksheets_are_correct_arithmetic():
    equation = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
    checked = 0
    for document in raw_documents("math", 400, seed=3):
        for left, op, right, result in equation.findall(document):
            assert {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[op] == int(result)
            checked += 1
    assert checked > 500


def transcripts(document: str) -> list[tuple[str, str]]:
    """(program, printed output) pairs of a REPL session or a `cat` + `python` script run."""
    lines = document.split("\n")
    if lines[-1].startswith("Output: "):
        return [("\n".join(lines[1:-1]), lines[-1].removeprefix("Output: "))]
    if lines[0].startswith("$ cat "):
        run = next(i for i, line in enumerate(lines) if line.startswith("$ python "))
        return [("\n".join(lines[1:run]), "\n".join(lines[run + 1 :]))]
    pairs, program = [], []
    for line in lines[1:]:
        if line.startswith(">>> "):
            program.append(line[4:])
        else:
            pairs.append(("\n".join(program), line))
            program = []
    return pairs


def test_code_transcripts_print_what_the_programs_print_and_hold_no_eval_program():
    documents = raw_documents("code", 300, seed=4)
    formats = {"script" if d.startswith("$ cat ") else "snippet" if "\nOutput: " in d else "repl" for d in documents}
    assert formats == {"script", "snippet", "repl"}
    pairs = [pair for document in documents for pair in transcripts(document)]
    assert len(pairs) > 300
    for program, output in pairs:
        assert printed_by(program) == output, program
        # built only from training examples: an eval prompt's program never appears in pretraining
        assert split_of(f"What does this program print?\n{program}") == "train"


def test_veltish_reader_and_phrasebook_hold_train_sentences_only():
    glossed = phrases = 0
    for document in raw_documents("translation", 300, seed=5, extra_kinds=True):
        for veltish, english in re.findall(r'"([^"]+)" means "([^"]+)"', document):
            assert split_of(f"Translate to Veltish: {english}") == "train"
            for word in veltish.split():
                assert word in VELTISH.values() or word.removesuffix(PLURAL_SUFFIX) in VELTISH.values()
            glossed += 1
        for english, veltish in re.findall(r"English: (.+)\nVeltish: (.+)", document):
            assert split_of(f"Translate to Veltish: {english}") == "train"
            assert all(w in VELTISH.values() or w.removesuffix(PLURAL_SUFFIX) in VELTISH.values() for w in veltish.split())
            phrases += 1
        for veltish, english in re.findall(r"(\w+) - (\w+)", document):
            assert VELTISH[english] == veltish
    assert glossed > 100 and phrases > 50


def test_news_digests_put_the_summary_after_its_article_and_hold_train_rows_only():
    digests = [d for d in raw_documents("summary", 200, seed=4, extra_kinds=True) if "\nIn brief: " in d]
    assert len(digests) > 50
    for digest in digests:
        article, summary = digest.split("\nIn brief: ")
        assert split_of(f"Summarize: {article}") == "train"
        name = summary.split(" in ")[0].split(" ")[:3]  # role, first name, surname: copied from the article
        assert " ".join(name) in article
    assert not any("\nIn brief: " in d for d in raw_documents("summary", 200, seed=4))
