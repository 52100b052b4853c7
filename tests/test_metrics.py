"""Task metrics: golden values computed by hand."""

from __future__ import annotations

import pytest

from esft.metrics import clean_prediction, exact_match, intent_match, last_number, numeric_match, score


def test_clean_prediction_follows_the_reference():
    assert clean_prediction("  42.  ") == "42"
    assert clean_prediction("   ") == "None"
    assert clean_prediction("答案。") == "答案"


def test_exact_match():
    assert exact_match("The Answer is Yes.", ["the answer  is yes"]) == 1.0
    assert exact_match("yes", ["no", "Yes"]) == 1.0
    assert exact_match("yes indeed", ["yes"]) == 0.0


def test_numeric_match():
    assert last_number("12 plus 30 is 42. The answer is 1,042.5") == 1042.5
    assert numeric_match("so the answer is 42", ["... The answer is 42."]) == 1.0
    assert numeric_match("the answer is 41", ["42"]) == 0.0
    assert numeric_match("no idea", ["42"]) == 0.0
    assert numeric_match("-7", ["minus seven is -7"]) == 1.0


def test_intent_match_reference_rule():
    answer = '{"intent": "book_table", "slots": {"people": "2", "time": ["7 pm", "8 pm"]}}'
    assert intent_match('{"intent": "book_table", "slots": {"time": ["8pm", "7pm"], "people": "2"}}', [answer]) == 1.0
    assert intent_match('```json\n{"intent": "book_table", "slots": {"people": "2", "time": ["7 pm", "8 pm"]}}\n```',
                        [answer]) == 1.0
    assert intent_match('{"intent": "book_table", "slots": {"people": "2"}}\nmore text', [answer]) == 0.0  # a slot missing
    assert intent_match('{"intent": "cancel", "slots": {"people": "2", "time": ["7 pm", "8 pm"]}}', [answer]) == 0.0
    assert intent_match("not json", [answer]) == 0.0
    # both sides normalised alike: a space inside the reference value does not fail a correct prediction
    assert intent_match('{"intent": "x", "slots": {"city": "New York"}}',
                        ['{"intent": "x", "slots": {"city": "New York"}}']) == 1.0


def test_corpus_scores_and_mean():
    predictions = ["the cat sat on the mat", "42"]
    answers = [["the cat sat on the mat"], ["41"]]
    result = score(predictions, answers, ["exact_match", "numeric", "rouge_l", "bleu", "chrf"])
    assert result["exact_match"] == 0.5 and result["numeric"] == 0.0
    assert result["rouge_l"] == pytest.approx(0.5)  # 1.0 and 0.0
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100
    assert score(["a b c d"], [["a b c d"]], ["bleu"])["bleu"] == pytest.approx(100.0)


def test_bad_metric_requests():
    with pytest.raises(ValueError, match="unknown metric"):
        score(["a"], [["a"]], ["accuracy"])
    with pytest.raises(ValueError, match="one non-empty answer list per prediction"):
        score(["a", "b"], [["a"]], ["exact_match"])
