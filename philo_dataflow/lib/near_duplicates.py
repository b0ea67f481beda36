"""Near-duplicate questions: content words, their Jaccard similarity, groups of reworded questions found
with MinHash LSH (``datasketch``) and confirmed exactly, and the hold-out questions that have a
near-duplicate in the train split (the split's leakage).

Two questions are near-duplicates when the Jaccard similarity of their content-word sets is at least a
threshold: ``|A ∩ B| / |A ∪ B| >= threshold``. "Can you explain: what is wu wei in Taoism?" and "What is
wu wei in Taoism?" have the content words {explain, wu, wei, taoism} and {wu, wei, taoism}: 0.75.

Imports nothing of the package.
"""

import json
import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

from datasketch import MinHash, MinHashLSH

#: The 179-word English stop-word list of NLTK's ``stopwords`` corpus (nltk_data,
#: ``corpora/stopwords/english``), verbatim. Words are split at apostrophes (see ``content_words``), so the
#: entries holding one never match a word; their parts ("don", "t") do.
ENGLISH_STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
whom this that that'll these those am is are was were be been being have has had having do does did doing a
an the and but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s t
can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

#: Permutations of each MinHash signature (datasketch's default).
NUM_PERM = 128
#: Seed of the MinHash permutations: fixed, so the signatures and hence the groups are the same every run.
MINHASH_SEED = 1
#: Largest chance that LSH fails to propose a pair whose Jaccard is exactly the threshold (pairs above it
#: are missed less often); chooses the bands in ``lsh_bands``.
LSH_MISS_PROBABILITY = 1e-4

_WORD = re.compile(r"[^\W_]+")


def conversation_text(question: str, context: str = "[]") -> str:
    """What near-duplicate grouping, leakage and duplicate checks compare of a record: the conversation
    that leads to its answer, i.e. the contents of its earlier user and assistant turns then ``question``,
    one a line. A system message is left out (one shared by every record would make them all alike).

    :param question: the last user turn (a record's ``input_text``).
    :param context: JSON of the ``{"role", "content"}`` messages before it (``"[]"`` for a single-turn
        record, whose text is then ``question`` itself).
    """
    turns = [message["content"] for message in json.loads(context or "[]") if message.get("role") != "system"]
    return "\n".join(turns + [question])


def content_words(text: str) -> frozenset:
    """The content words of ``text``: its lowercased word tokens (runs of letters and digits, so
    apostrophes and hyphens split words) minus ``ENGLISH_STOP_WORDS``."""
    return frozenset(word for word in _WORD.findall(text.lower()) if word not in ENGLISH_STOP_WORDS)


def jaccard(first: frozenset, second: frozenset) -> float:
    """``|first ∩ second| / |first ∪ second|`` in [0, 1]; 0 when both are empty (a question of stop
    words only is no one's near-duplicate)."""
    union = len(first | second)
    return len(first & second) / union if union else 0.0


def content_word_jaccard(first: str, second: str) -> float:
    """The Jaccard similarity of two texts' content words (``content_words``, ``jaccard``)."""
    return jaccard(content_words(first), content_words(second))


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> tuple:
    """``(bands, rows)`` of the LSH index: the most rows per band (the fewest candidates to confirm) for
    which a pair of Jaccard ``threshold`` still shares a band with probability at least
    ``1 - LSH_MISS_PROBABILITY``; the pair is missed with probability ``(1 - threshold**rows)**bands``
    (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3.4). 0.8 and 128 give (25, 5). Below
    a threshold of about 0.07 no choice meets the bound and every row is a band.

    :raises ValueError: ``threshold`` outside (0, 1).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold={threshold!r}: LSH bands need a threshold in (0, 1)")
    for rows in range(num_perm // 2, 0, -1):  # datasketch needs two bands or more
        bands = num_perm // rows
        if (1 - threshold**rows) ** bands <= LSH_MISS_PROBABILITY:
            return bands, rows
    return num_perm, 1


def near_duplicate_pairs(questions: Sequence[str], threshold: float) -> list:
    """Pairs ``(i, j)``, ``i < j``, of questions whose content-word Jaccard is at least ``threshold``,
    enough to join every near-duplicate group (``groups_of``): not every such pair is listed.

    A question with the same content words as an earlier one is paired with the first of them; the
    first ones are proposed to each other by MinHash LSH (``NUM_PERM`` permutations seeded with
    ``MINHASH_SEED``, bands from ``lsh_bands``) and paired only when their exact Jaccard reaches the
    threshold. So every pair returned is a true one, and a true pair is missed with probability below
    ``LSH_MISS_PROBABILITY``. A question without content words pairs with none.

    :param questions: the questions, in record order.
    :param threshold: in (0, 1]; 1 pairs only questions with identical content words.
    :return: sorted list of index pairs.
    """
    words = [content_words(question) for question in questions]
    pairs = set()
    first_with = {}
    for index, question_words in enumerate(words):
        if question_words:
            if question_words in first_with:
                pairs.add((first_with[question_words], index))
            else:
                first_with[question_words] = index
    distinct = sorted(first_with.values())
    if threshold < 1 and len(distinct) > 1:
        bands, rows = lsh_bands(threshold)
        signatures = MinHash.bulk(
            [[word.encode("utf-8") for word in sorted(words[index])] for index in distinct],
            num_perm=NUM_PERM, seed=MINHASH_SEED, scheme="affine32",
        )
        index_of = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, params=(bands, rows))
        for index, signature in zip(distinct, signatures):
            index_of.insert(index, signature)
        for index, signature in zip(distinct, signatures):
            for other in index_of.query(signature):
                if other > index and jaccard(words[index], words[other]) >= threshold:
                    pairs.add((index, other))
    return sorted(pairs)


def groups_of(count: int, pairs: Iterable) -> list:
    """The groups that ``pairs`` of item indices join, transitively (union-find): for each of ``count``
    items, the index of its group's first item (an item in no pair is its own group)."""
    parent = list(range(count))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for first, second in pairs:
        first, second = root(first), root(second)
        if first != second:
            parent[max(first, second)] = min(first, second)  # a group's root is its first item
    return [root(item) for item in range(count)]


def near_duplicate_groups(questions: Sequence[str], threshold: float) -> list:
    """For each question, the index of the first question of its near-duplicate group: the questions
    joined, transitively, by ``near_duplicate_pairs(questions, threshold)``."""
    return groups_of(len(questions), near_duplicate_pairs(questions, threshold))


def leaked_questions(hold_out_questions: Sequence[str], train_questions: Sequence[str], threshold: float) -> list:
    """The indices of the hold-out questions that have a near-duplicate in the train split: a train
    question of content-word Jaccard ``threshold`` or more. Exact (no MinHash): a set ``B`` with
    ``J(A, B) >= t`` holds at least ``ceil(t·|A|)`` words of ``A``, hence one of any
    ``|A| - ceil(t·|A|) + 1`` of them, so only the train questions holding one of ``A``'s rarest words are
    compared (prefix filtering; Chaudhuri, Ganti & Kaushik, ICDE 2006).

    :return: sorted indices into ``hold_out_questions``.
    """
    train_words = [content_words(question) for question in train_questions]
    frequency = Counter(word for words in train_words for word in words)
    holding = defaultdict(list)
    for index, words in enumerate(train_words):
        for word in words:
            holding[word].append(index)
    leaked = []
    for index, question in enumerate(hold_out_questions):
        words = content_words(question)
        if not words:
            continue
        # the epsilon only lengthens the prefix, so float rounding cannot drop a true pair
        prefix_length = len(words) - math.ceil(threshold * len(words) - 1e-9) + 1
        prefix = sorted(words, key=lambda word: (frequency[word], word))[:prefix_length]
        candidates = {other for word in prefix for other in holding.get(word, ())}
        if any(jaccard(words, train_words[other]) >= threshold for other in candidates):
            leaked.append(index)
    return leaked
