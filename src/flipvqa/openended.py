"""Scores for open-ended (free-text) answers: SQuAD v1.1's exact match and token F1, and WUPS as
NExT-OE's official evaluation computes it (github doc-doc/NExT-OE: eval_oe.py, metrics.py,
stopwords.txt; it ran with NLTK 3.3 and pywsd 1.2.4, whose ``lemmatize_sentence`` it calls).

Departures, forced by what exists offline: pywsd POS-tags each answer with NLTK's perceptron tagger
(a download) to choose the lemmatiser's part of speech; here the part of speech is guessed from
WordNet itself (see :meth:`WordNet.guess_pos`). NLTK's ``word_tokenize`` first splits sentences
with punkt (a download); here it tokenises the answer as one line (``preserve_line=True``).
"""

from __future__ import annotations

import io
import os
import re
import string
import warnings
from collections import Counter
from collections.abc import Collection
from typing import Any, Optional

DEBIAN_WORDNET = "/usr/share/wordnet"  # Debian's wordnet-base (WordNet 3.0, as NLTK's "wordnet")

# NExT-OE's type codes for count (DC) and yes/no (DB) questions: scored by exact match, not WUPS.
EXACT_QTYPES = frozenset({"DC", "DB"})

# NExT-OE's stopwords.txt ("stopwords tailored for NExT-QA"), verbatim and in its order.
STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while to from of at for with
about into through during again further then here there when where why how all any each most other
some such only own so than too very s t can will just don don't should should've now d ll m o re ve
y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't
isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
weren weren't won won't wouldn wouldn't
""".split())

# Forms of be/have/do: the tagger calls them verbs (VB*), so pywsd lemmatises them to be/have/do.
_AUXILIARIES = frozenset("am is are was were be been being have has had having do does did doing".split())

# WordNet 3.0's lexicographer files, numbered (lexnames(5WN)). Debian's wordnet-base lacks the
# ``lexnames`` file that NLTK's reader insists on, so it is served from here.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body "
    "verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact "
    "verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()
_LEX_POS = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_PUNCTUATION = frozenset(string.punctuation)
_WORDNET_FILES = ("index.noun", "data.noun", "index.verb", "data.verb", "noun.exc", "verb.exc")


# ----------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    norm = normalize_answer(prediction)
    return any(norm == normalize_answer(a) for a in answers)


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    # SQuAD v1.1's script returns 0 when nothing overlaps, even when both are empty (v2.0 gives 1).
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: list[str]) -> float:
    return max((_f1(prediction, a) for a in answers), default=0.0)


# ----------------------------------------------------------------------------- WordNet


class WordNet:
    """WordNet 3.0 through an NLTK ``WordNetCorpusReader``, with the look-ups WUPS repeats cached."""

    def __init__(self, reader: Any) -> None:
        from nltk.stem import PorterStemmer

        self.reader = reader
        self._stemmer = PorterStemmer()  # pywsd's fallback when a lemma is not in WordNet
        self._first: dict[str, Any] = {}
        self._sim: dict[tuple[str, str], float] = {}

    def first_synset(self, word: str) -> Any:
        """The first synset over all parts of speech (NExT-OE's "match the first"), or None."""
        if word not in self._first:
            found = self.reader.synsets(word)
            self._first[word] = found[0] if found else None
        return self._first[word]

    def wup_similarity(self, word1: str, word2: str) -> float:
        """Wu-Palmer similarity of the words' first synsets; 0 when either has none or no path."""
        key = (word1, word2)
        if key not in self._sim:
            s1, s2 = self.first_synset(word1), self.first_synset(word2)
            sim = None
            if s1 is not None and s2 is not None:
                # NLTK 3.3 (NExT-OE's) simulates a root only when the first synset needs one (non-
                # nouns); later NLTK also does when the second does. Passing it keeps 3.3's values.
                sim = s1.wup_similarity(s2, simulate_root=s1.pos() != "n")
            self._sim[key] = float(sim or 0.0)
        return self._sim[key]

    def lemma(self, word: str, pos: str) -> str:
        """NLTK's WordNetLemmatizer: the shortest base form, the word itself when none."""
        forms = self.reader._morphy(word, pos)
        return min(forms, key=len) if forms else word

    def guess_pos(self, word: str) -> str:
        """The offline stand-in for the tagger: be/have/do forms, and forms WordNet reduces only as
        verbs (ran, sits) or that end in -ing/-ed (running, walked), are verbs; comparatives
        (bigger) adjectives; anything else a noun, as pywsd defaults to."""
        if word in _AUXILIARIES:
            return "v"
        if self.lemma(word, "v") != word and (word.endswith(("ing", "ed")) or self.lemma(word, "n") == word):
            return "v"
        return "a" if self.lemma(word, "a") != word else "n"

    def lemmatize(self, word: str) -> str:
        """pywsd's ``lemmatize``: the lemma when WordNet knows it, else the Porter stem when WordNet
        knows that, else the word."""
        word = word.lower()
        lemma = self.lemma(word, self.guess_pos(word))
        if self.reader.synsets(lemma):
            return lemma
        stem = self._stemmer.stem(word)
        return stem if self.reader.synsets(stem) else word


def _nltk_wordnet() -> Any:
    """NLTK's own WordNet (``nltk.download('wordnet')``), or None when it is not installed."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except (LookupError, OSError, ValueError):
        return None
    return wordnet


def _files_reader(root: str) -> Any:
    """A reader of a folder of WordNet 3.0 database files (Debian's layout), or None without them."""
    if not all(os.path.isfile(os.path.join(root, f)) for f in _WORDNET_FILES):
        return None
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    has_lexnames = os.path.isfile(os.path.join(root, "lexnames"))

    class FilesReader(WordNetCorpusReader):
        def open(self, file: str) -> Any:
            if file == "lexnames" and not has_lexnames:
                return io.StringIO("".join(f"{i:02d}\t{name}\t{_LEX_POS[name.split('.')[0]]}\n"
                                           for i, name in enumerate(_LEXNAMES)))
            return super().open(file)

        # The mapping to WordNet 3.0 serves only Open Multilingual WordNet look-ups, never made
        # here, and NLTK >= 3.10 builds it from its own downloaded WordNet (index.sense).
        def map_wn(self, version: str = "wordnet") -> None:
            return None

        def map_wn30(self) -> None:
            return None

    # NLTK >= 3.10 reads corpus files only under its data path.
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return FilesReader(root, None)


def load_wordnet(root: Optional[str | os.PathLike] = None) -> Optional[WordNet]:
    """WordNet found offline: NLTK's own data, else Debian's files in /usr/share/wordnet; only the
    folder ``root`` when given. None when there is none or NLTK is not installed."""
    try:
        import nltk  # noqa: F401
    except ImportError:
        return None
    try:
        reader = _files_reader(str(root)) if root is not None else (
            _nltk_wordnet() or _files_reader(DEBIAN_WORDNET))
    except (OSError, ValueError, LookupError) as e:
        warnings.warn(f"WordNet could not be read ({e}); WUPS is left out", stacklevel=2)
        return None
    return WordNet(reader) if reader is not None else None


# ----------------------------------------------------------------------------- WUPS (NExT-OE)


def _tokenize(text: str) -> list[str]:
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)


def content_words(text: str, wordnet: WordNet) -> str:
    """NExT-OE's ``remove_stop``: tokenise, lemmatise (pywsd) and drop its stop words, which are
    matched after lemmatisation (so "is" goes as "be"); joined by spaces."""
    lemmas = (wordnet.lemmatize(w) for w in _tokenize(text))
    return " ".join(w for w in lemmas if w not in STOPWORDS)


def _wup(word1: str, word2: str, alpha: float, wordnet: WordNet) -> float:
    if word1 == word2:
        return 1.0
    sim = wordnet.wup_similarity(word1, word2)
    return 0.1 * sim if sim < alpha else sim  # NExT-OE's threshold: weak matches count a tenth


def _wups_one_way(words1: list[str], words2: list[str], alpha: float, wordnet: WordNet) -> float:
    """Product over words1 of the best match in words2. As in NExT-OE, words with no match at all
    are skipped, not zeroed, and the score is 0 only when no word matched."""
    product, matched = 1.0, False
    for w1 in words1:
        best = max((_wup(w1, w2, alpha, wordnet) for w2 in words2), default=0.0)
        if best > 0:
            product, matched = product * best, True
    return product if matched else 0.0


def _wups_pair(prediction: str, answer: str, alpha: float, wordnet: WordNet) -> float:
    """NExT-OE's ``get_wups`` on two stop-word-free strings: the smaller of the two directions."""
    pred, gold = _tokenize(prediction), _tokenize(answer)
    return min(_wups_one_way(pred, gold, alpha, wordnet), _wups_one_way(gold, pred, alpha, wordnet))


def wups(prediction: str, answers: list[str], alpha: float, qtype: Optional[str], wordnet: WordNet,
         *, exact_qtypes: Collection = EXACT_QTYPES) -> float:
    """WUPS@alpha of a prediction against its best acceptable answer (NExT-OE takes the max over
    its answer and the additional reference answer). Count and yes/no types (``exact_qtypes``)
    score 1 or 0 by comparing the stop-word-free lemmas instead."""
    pred = content_words(prediction, wordnet)
    golds = [content_words(a, wordnet) for a in answers]
    if qtype in exact_qtypes:
        return float(pred in golds)
    return max((_wups_pair(pred, g, alpha, wordnet) for g in golds), default=0.0)


def _answers(row: dict) -> list[str]:
    answer = row.get("answer")
    if answer is None:
        return []
    return [answer] if isinstance(answer, str) else [str(a) for a in answer]


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], wordnet: Optional[WordNet], *,
              exact_qtypes: Collection = EXACT_QTYPES) -> dict:
    """Means in [0, 1] over the rows that have an answer: exact match, token F1, WUPS@0 and
    WUPS@0.9 (None without WordNet; every value None when no row has an answer). Rows whose types
    are integer codes need ``exact_qtypes`` to name the count and yes/no codes."""
    scored = [(str(r["prediction"]), _answers(r), r.get("qtype")) for r in rows if _answers(r)]
    out: dict[str, Optional[float]] = {
        "exact_match": _mean([float(exact_match(p, a)) for p, a, _ in scored]),
        "f1": _mean([token_f1(p, a) for p, a, _ in scored]),
        "wups0": None,
        "wups9": None,
    }
    if wordnet is not None:
        for key, alpha in (("wups0", 0.0), ("wups9", 0.9)):
            out[key] = _mean([wups(p, a, alpha, t, wordnet, exact_qtypes=exact_qtypes) for p, a, t in scored])
    return out
