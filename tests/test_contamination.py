import time

import numpy as np

from jit_tune.data.contamination import COMMON, NGRAM, THRESHOLD, TrainingIndex, contamination, report_lines

WORDS = [f"w{i}" for i in range(40)]
TRAIN = " ".join(WORDS)  # 40 distinct words: every 13-word run is unique
SHORT = "Reverse the order of these words: moon sun"  # 8 words


def test_copy_modulo_case_punctuation_and_spacing_is_exact():
    index = TrainingIndex([TRAIN, SHORT])
    copy = "  " + TRAIN.upper().replace(" ", " ,\t ") + "!"
    assert index.overlaps(copy) == (True, True)
    assert index.overlaps("reverse THE order of these words moon   sun.") == (True, False)


def test_embedded_13_word_span_is_an_ngram_overlap_not_exact():
    index = TrainingIndex([TRAIN])
    text = "some other words " + " ".join(WORDS[10:10 + NGRAM]) + " and more after"
    assert index.overlaps(text) == (False, True)


def test_12_shared_words_in_a_row_are_not_an_overlap():
    index = TrainingIndex([TRAIN])
    text = "some other words " + " ".join(WORDS[10:10 + NGRAM - 1]) + " and more after"
    assert index.overlaps(text) == (False, False)
    # Two 12-word runs of training text, broken apart, are not either.
    text = " ".join(WORDS[:12]) + " break " + " ".join(WORDS[12:24])
    assert index.overlaps(text) == (False, False)


def test_short_texts_only_match_exactly():
    index = TrainingIndex([SHORT])
    assert len(index.ngrams) == 0
    assert index.overlaps(SHORT) == (True, False)
    assert index.overlaps("Please: " + SHORT + " now") == (False, False)
    # A long eval text containing a short training text whole is no match either.
    assert index.overlaps(SHORT + " " + TRAIN) == (False, False)
    assert index.overlaps("") == (False, False)


def test_contamination_shares_and_flag_at_threshold():
    index = TrainingIndex([TRAIN, SHORT])
    clean = [f"clean example number {i}" for i in range(100)]
    results = contamination(index, {
        "at": [SHORT] + clean[:99],  # 1/100 == THRESHOLD: not above it
        "above": [SHORT, TRAIN] + clean[:98],  # exact 2/100, n-gram 1/100
        "ngram": ["x " + TRAIN, TRAIN + " y"] + clean[:98],  # n-gram 2/100 only
        "empty": [],
    })
    assert results["at"] == {"examples": 100, "exact": 0.01, "ngram": 0.0, "flagged": False, "n": NGRAM}
    assert results["above"] == {"examples": 100, "exact": 0.02, "ngram": 0.01, "flagged": True, "n": NGRAM}
    assert results["ngram"] == {"examples": 100, "exact": 0.0, "ngram": 0.02, "flagged": True, "n": NGRAM}
    assert results["empty"] == {"examples": 0, "exact": 0.0, "ngram": 0.0, "flagged": False, "n": NGRAM}
    assert THRESHOLD == 0.01

    lines = report_lines(results)
    assert len(lines) == 4 + 2
    assert lines[0].startswith("at: 100 examples, 1.0% exact")
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert [w.split()[1] for w in warnings] == ["above", "ngram"]
    assert "2.0%" in warnings[1] and "13-gram" in warnings[1]
    generated = contamination(index, {"ngram": ["x " + TRAIN, TRAIN + " y"], "above": [SHORT, TRAIN]},
                              generated=frozenset({"ngram", "above"}))  # n-grams are chance; exact matches are not
    assert not generated["ngram"]["flagged"] and generated["above"]["flagged"]


def test_large_index_has_no_duplicate_ngrams():
    rng = np.random.default_rng(0)
    vocab = np.array([f"word{i}" for i in range(2000)])
    texts = [" ".join(vocab[rng.integers(0, len(vocab), 50)]) for _ in range(9000)]
    texts += texts[:1000]  # 10,000 texts, a tenth of them repeated
    start = time.perf_counter()
    index = TrainingIndex(texts)
    assert time.perf_counter() - start < 30
    distinct = {tuple(t.split()[i: i + NGRAM]) for t in texts for i in range(50 - NGRAM + 1)}
    assert index.ngrams.dtype == np.int64
    assert np.all(np.diff(index.ngrams) > 0)  # sorted and unique
    # Equal unless two distinct 13-grams collide in 64 bits (odds about 1e-8 here).
    assert len(index.ngrams) == len(distinct) <= len(texts) * (50 - NGRAM + 1)
    assert len(index.exact) == 9000
    assert index.overlaps(texts[123]) == (True, True)


def test_a_templates_fixed_wording_is_not_an_overlap():
    """Every example of a template shares its fixed 13+ words; only the passage counts."""
    wording = "read the following article carefully and then answer the question that comes after it please"
    train = [f"{wording} article number {i} about topic {i * 7}" for i in range(COMMON + 1)]
    index = TrainingIndex(train + [TRAIN])
    assert index.overlaps(f"{wording} an article nobody trained on") == (False, False)
    assert index.overlaps(f"{wording} {TRAIN}")[1]  # the copied passage still counts
