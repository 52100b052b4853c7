"""Task metrics for generated answers: exact match, numeric accuracy, JSON intent match, ROUGE-L,
BLEU and chrF (the last three through rouge-score and sacrebleu, the reference implementations).

Every per-sample metric returns a value in [0, 1]; corpus metrics (BLEU, chrF) are in [0, 100] as
sacrebleu reports them.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Sequence

from esft.errors import EsftError

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def clean_prediction(raw: str) -> str:
    """The reference's post-processing: strip, empty -> "None", drop trailing full stops."""
    prediction = raw.strip()
    return prediction.strip(".。") if prediction else "None"


def _normalise_text(text: str) -> str:
    text = text.lower().strip().strip(string.punctuation + "。")
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the prediction equals any answer after lower-casing, trimming end punctuation and
    collapsing white space."""
    normalised = _normalise_text(prediction)
    return float(any(normalised == _normalise_text(answer) for answer in answers))


def last_number(text: str) -> float | None:
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def numeric_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the last number in the prediction equals the last number of any answer (math data)."""
    predicted = last_number(prediction)
    if predicted is None:
        return 0.0
    for answer in answers:
        expected = last_number(answer)
        if expected is not None and abs(predicted - expected) <= 1e-6 * max(1.0, abs(expected)):
            return 1.0
    return 0.0


def _json_candidate(prediction: str) -> str:
    """The reference's extraction: a ```json block if there is one, else the first non-empty line."""
    text = prediction
    if "```json" in text:
        text = text[text.index("```json") + 7:]
        text = text[: text.index("```")] if "```" in text else text
    lines = [line for line in text.split("\n") if line.strip()]
    return (lines[0] if lines else text).strip().strip(".。")


def _slot_set(slots: object) -> set[tuple[str, str]]:
    """Slots normalised identically on both sides (the reference strips spaces from predictions
    only, which can fail a correct prediction): values as strings without spaces, lists sorted."""
    if not isinstance(slots, dict):  # caught by intent_match: the prediction scores 0
        raise ValueError("slots must be an object")

    def norm(value: object) -> str:
        if isinstance(value, list):
            return str(tuple(sorted(str(v).replace(" ", "") for v in value)))
        return str(value).replace(" ", "")

    return {(str(key), norm(value)) for key, value in slots.items()}


def intent_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the predicted JSON has the answer's intent and exactly its slots (the reference rule)."""
    try:
        predicted = json.loads(_json_candidate(prediction))
        expected = json.loads(answers[0])
        if not isinstance(predicted, dict) or not isinstance(expected, dict):
            return 0.0
        same_intent = predicted.get("intent", "") == expected.get("intent", "")
        return float(same_intent and _slot_set(predicted.get("slots", {})) == _slot_set(expected.get("slots", {})))
    except (ValueError, TypeError):
        return 0.0


def rouge_l(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [max(scorer.score(answer, prediction)["rougeL"].fmeasure for answer in refs)
              for prediction, refs in zip(predictions, answers)]
    return sum(scores) / len(scores)


def _references(answers: Sequence[Sequence[str]]) -> list[list[str]]:
    """sacrebleu wants one list per reference position; pad samples with fewer answers."""
    width = max(len(refs) for refs in answers)
    return [[refs[i] if i < len(refs) else refs[0] for refs in answers] for i in range(width)]


def bleu(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), _references(answers)).score)


def chrf(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), _references(answers)).score)


PER_SAMPLE: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "numeric": numeric_match,
    "intent": intent_match,
}
CORPUS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "rouge_l": rouge_l,
    "bleu": bleu,
    "chrf": chrf,
}
METRICS = tuple(PER_SAMPLE) + tuple(CORPUS)
PERCENT_METRICS = ("bleu", "chrf")  # sacrebleu reports these in [0, 100]; every other metric is in [0, 1]


def unit_scale(metric: str, value: float) -> float:
    """A metric's value in [0, 1], whichever scale its library reports."""
    return value / 100 if metric in PERCENT_METRICS else value


def score(predictions: Sequence[str], answers: Sequence[Sequence[str]], metrics: Sequence[str]) -> dict[str, float]:
    """Mean per-sample metrics and corpus metrics over cleaned predictions."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise EsftError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not predictions or len(predictions) != len(answers):  # a caller's bug: plain ValueError
        raise ValueError(f"need one non-empty answer list per prediction ({len(predictions)} predictions, "
                         f"{len(answers)} answer lists)")
    cleaned = [clean_prediction(p) for p in predictions]
    results = {}
    for name in metrics:
        if name in PER_SAMPLE:
            results[name] = sum(PER_SAMPLE[name](p, a) for p, a in zip(cleaned, answers)) / len(cleaned)
        else:
            results[name] = CORPUS[name](cleaned, answers)
    return results
