import pytest

from llm.scores import RecordScore, exact_match, normalise, rouge_l_f1, score_responses


def test_normalise_folds_case_and_collapses_whitespace_only():
    assert normalise("  Straße\tIST\n\n GROSS. ") == "strasse ist gross."


def test_identical_texts_score_perfectly_also_after_normalising():
    assert exact_match("The capital of France is Paris.", "The capital of France is Paris.") == 1.0
    assert exact_match("  the capital of\nfrance is PARIS. ", "The capital of France is Paris.") == 1.0
    assert rouge_l_f1("The capital of France is Paris.", "The capital of France is Paris.") == 1.0


def test_disjoint_texts_score_zero():
    assert exact_match("Cold.", "Hot.") == 0.0
    assert rouge_l_f1("Cold weather today", "Hot summer nights") == 0.0


def test_punctuation_counts_for_exact_match_but_not_for_rouge():
    assert exact_match("Paris", "Paris.") == 0.0
    assert rouge_l_f1("Paris", "Paris.") == 1.0


def test_a_partial_match_scores_by_the_longest_common_subsequence():
    # the cat sat on the mat / the cat lay on a mat: LCS "the cat on mat", 4 of 6 tokens each side.
    assert rouge_l_f1("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # Stemmed: [the, dog, are, run] / [the, dog, run]: LCS 3, P = 3/4, R = 1, F1 = 2PR / (P + R) = 6/7.
    assert rouge_l_f1("The dogs are running", "the dog runs") == pytest.approx(6 / 7)


def test_an_empty_response_scores_zero():
    assert exact_match("", "Paris.") == 0.0
    assert rouge_l_f1("", "Paris.") == 0.0


def test_scores_per_record_and_averaged():
    scores = score_responses(["Paris.", "", "The dogs are running"], ["paris.", "Rome.", "the dog runs"])
    assert scores.per_record[:2] == (RecordScore(1.0, 1.0), RecordScore(0.0, 0.0))
    assert scores.per_record[2].exact_match == 0.0
    assert scores.per_record[2].rouge_l_f1 == pytest.approx(6 / 7)
    assert scores.count == 3
    assert scores.exact_match == pytest.approx(1 / 3)
    assert scores.rouge_l_f1 == pytest.approx((1 + 0 + 6 / 7) / 3)


def test_responses_and_references_must_pair_up():
    with pytest.raises(ValueError, match=r"^got 2 responses but 1 references: give one reference per"):
        score_responses(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"^no responses to score: the test split is empty$"):
        score_responses([], [])
