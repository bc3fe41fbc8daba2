"""Open-ended answer scores: SQuAD v1.1's normalisation, exact match and token F1 by hand, and
NExT-OE's WUPS on Debian's WordNet (or NLTK's), checked against NLTK's own Wu-Palmer similarity."""

import os
import sys

import pytest

from flipvqa.openended import (STOPWORDS, content_words, exact_match, load_wordnet, normalize_answer,
                               summarize, token_f1, wups)


@pytest.fixture(scope="module")
def wn():
    """WordNet, loaded once. CI installs nltk (the test extra) and wordnet-base (.ci/run), so
    there a missing WordNet fails instead of skipping."""
    if "CI" not in os.environ:
        pytest.importorskip("nltk", reason="nltk is not installed (pip install -e '.[oe]')")
    found = load_wordnet()
    if found is None:
        why = "WordNet not found: needs nltk and Debian's wordnet-base (/usr/share/wordnet) or NLTK's data"
        if "CI" in os.environ:
            pytest.fail(why)
        pytest.skip(why)
    return found


def sim(wn, a: str, b: str) -> float:
    """NLTK's own Wu-Palmer similarity of two named synsets."""
    return wn.reader.synset(a).wup_similarity(wn.reader.synset(b))


# ----------------------------------------------------------------------------- SQuAD


@pytest.mark.parametrize("text, want", [
    ("The Cat", "cat"),
    ("an apple a day", "apple day"),
    ("theatre another", "theatre another"),  # articles only as whole words
    ("The  man's   hat!", "mans hat"),
    ("Hello,\tworld\n", "hello world"),
    ("a-b (c)", "ab c"),
    ("  ", ""),
])
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_against_a_list():
    assert exact_match("The dog.", ["cat", "a dog"])
    assert not exact_match("dogs", ["dog"])
    assert not exact_match("dog", [])
    assert exact_match("the", ["a"])  # both normalise to ""


def test_token_f1_by_hand():
    # pred tokens cat sat on mat (4), gold cat sat (2): overlap 2, P 1/2, R 1 -> 2/3
    assert token_f1("the cat sat on mat", ["a cat sat"]) == pytest.approx(2 / 3)
    assert token_f1("the cat sat on mat", ["dog", "a cat sat"]) == pytest.approx(2 / 3)  # max
    # Counter overlap: dog dog dog vs dog -> overlap 1, P 1/3, R 1 -> 1/2
    assert token_f1("dog dog dog", ["dog"]) == pytest.approx(0.5)
    assert token_f1("red car", ["blue bike"]) == 0.0
    assert token_f1("Red car!", ["the red car"]) == 1.0
    # SQuAD v1.1's script: no overlap is 0, even when both sides are empty (v2.0 would give 1)
    assert token_f1("the", ["a"]) == 0.0
    assert token_f1("dog", []) == 0.0


# ----------------------------------------------------------------------------- WordNet


def test_load_wordnet_empty_folder_is_none(tmp_path):
    assert load_wordnet(tmp_path) is None
    (tmp_path / "data.noun").write_text("not wordnet\n")
    assert load_wordnet(tmp_path) is None


def test_load_wordnet_without_nltk_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # makes `import nltk` raise ImportError
    assert load_wordnet() is None


def test_stopwords_are_next_oe_list():
    assert len(STOPWORDS) == 156 and {"the", "be", "is", "wouldn't", "s"} <= STOPWORDS


def test_wordnet_reader(wn):
    # the lexicographer names served for Debian's files match the synsets' parts of speech
    assert wn.reader.synset("dog.n.01").lexname() == "noun.animal"
    assert wn.reader.synset("run.v.01").lexname() == "verb.motion"
    assert wn.wup_similarity("dog", "cat") == sim(wn, "dog.n.01", "cat.n.01") == pytest.approx(6 / 7)


def test_wup_simulates_root_as_nltk_33(wn):
    # NLTK 3.3 simulates a root only for a first synset that needs one: noun-to-verb finds no
    # common hypernym (0), verb-to-noun does.
    assert wn.first_synset("ran").pos() == "v" and wn.first_synset("dog").pos() == "n"
    assert wn.wup_similarity("dog", "ran") == 0.0
    assert wn.wup_similarity("ran", "dog") == pytest.approx(sim(wn, "run.v.01", "dog.n.01"))
    assert wn.wup_similarity("ran", "dog") > 0


def test_content_words_lemmatise_then_drop_stopwords(wn):
    assert content_words("The man is running.", wn) == "man run ."
    assert content_words("A boy was playing with the dogs", wn) == "boy play dog"
    assert content_words("bigger balls", wn) == "big ball"
    assert content_words("it is the", wn) == ""


# ----------------------------------------------------------------------------- WUPS


def test_wups_identical_and_unknown_words(wn):
    assert wups("dog", ["dog"], 0.9, "CW", wn) == 1.0
    assert wups("xyzzy", ["xyzzy"], 0.9, "CW", wn) == 1.0  # equal strings need no synset
    assert wups("xyzzy", ["plugh"], 0.0, "CW", wn) == 0.0  # nothing matched
    assert wups("the", ["a"], 0.0, "CW", wn) == 0.0  # nothing left after stop words


def test_wups_dog_cat_threshold(wn):
    dog_cat = sim(wn, "dog.n.01", "cat.n.01")
    assert wups("dog", ["cat"], 0.0, "CW", wn) == pytest.approx(dog_cat)
    assert wups("the dogs", ["a cat"], 0.9, None, wn) == pytest.approx(0.1 * dog_cat)  # below 0.9
    assert wups("dog", ["car", "cat"], 0.0, "CW", wn) == pytest.approx(
        max(dog_cat, sim(wn, "dog.n.01", "car.n.01")))  # best of the acceptable answers


def test_wups_product_min_and_skipped_words(wn):
    dog_cat = sim(wn, "dog.n.01", "cat.n.01")
    run_cat = wn.wup_similarity("run", "cat")
    # pred -> gold: dog*run vs cat; gold -> pred: max(cat~dog, cat~run); the smaller one counts
    want = min(dog_cat * run_cat, max(dog_cat, run_cat))
    assert wups("dog running", ["cat"], 0.0, "CW", wn) == pytest.approx(want)
    # a word with no match at all (no synset) is skipped, not a zero factor
    assert wups("dog xyzzy", ["dog"], 0.9, "CW", wn) == 1.0


def test_count_and_yes_no_by_exact_match(wn):
    assert wups("2", ["two"], 0.0, "DC", wn) == 0.0
    assert wups("the two", ["two"], 0.9, "DC", wn) == 1.0
    assert wups("four", ["three"], 0.0, "DC", wn) == 0.0  # WUPS would give partial credit
    assert wups("four", ["three"], 0.0, "CW", wn) > 0.0
    assert wups("yes", ["no", "Yes"], 0.0, "DB", wn) == 1.0
    assert wups("no", ["yes"], 0.0, "DB", wn) == 0.0
    assert wups("four", ["three"], 0.0, 7, wn, exact_qtypes={7}) == 0.0  # integer type codes


def test_summarize(wn):
    dog_cat = sim(wn, "dog.n.01", "cat.n.01")
    rows = [
        {"prediction": "a dog", "answer": ["the dog"], "qtype": "CW"},  # EM, F1 1; WUPS 1
        {"prediction": "cat", "answer": ["dog"], "qtype": "CW"},  # 0, 0; dog~cat (x0.1 at 0.9)
        {"prediction": "2", "answer": ["two"], "qtype": "DC"},  # 0, 0; 0
        {"prediction": "x", "answer": None, "qtype": "CW"},  # not scored
    ]
    got = summarize(rows, wn)
    assert got["exact_match"] == pytest.approx(1 / 3) and got["f1"] == pytest.approx(1 / 3)
    assert got["wups0"] == pytest.approx((1 + dog_cat) / 3)
    assert got["wups9"] == pytest.approx((1 + 0.1 * dog_cat) / 3)


def test_summarize_without_wordnet_or_answers():
    rows = [{"prediction": "red car", "answer": ["the red car", "car"], "qtype": 1},
            {"prediction": "red", "answer": ["red car"], "qtype": 2}]
    got = summarize(rows, None)
    assert got == {"exact_match": 0.5, "f1": pytest.approx((1 + 2 / 3) / 2), "wups0": None, "wups9": None}
    assert summarize([{"prediction": "a", "answer": None, "qtype": 1}], None) == {
        "exact_match": None, "f1": None, "wups0": None, "wups9": None}
