"""`pydocs`: the English reference text that ships with CPython (`pydoc_data.topics`).

It needs neither network nor data files, so every machine can calibrate and evaluate on real
English prose. The text depends on the Python version, which the variant therefore records.
"""

from __future__ import annotations

import platform

PYDOCS_SPLITS = ("train", "test")
TEST_EVERY = 5  # every 5th topic (in sorted order) is held out for evaluation
PARAGRAPH = "\n\n"


def pydocs_topics() -> dict[str, str]:
    # Some distributions strip pydoc_data; a plain ImportError then says what is missing.
    from pydoc_data.topics import topics

    return topics


def pydocs_rows(split: str) -> list[str]:
    """Topic texts of one split, in sorted topic order.

    Topics are sorted by key (dict order could change between Python builds) and topic i goes
    to "test" when i % 5 == 0, to "train" otherwise, so the split is the same on every run.

    Topics overlap: some share one text ("else" and "if") and broad topics repeat narrow ones
    ("specialnames" contains all of "customization", "compound" contains "for"). So that
    calibration never sees evaluation text, every paragraph (block between blank lines) of a
    "train" topic that also is a paragraph of a "test" topic is removed from "train", and a
    train topic left empty is dropped. The "test" rows are the held-out topics unchanged.
    What stays shared is a few sentences wrapped differently in two topics (in 3.11 no
    512-character span of "train" occurs in "test").
    """
    if split not in PYDOCS_SPLITS:
        raise ValueError(f"pydocs has splits {PYDOCS_SPLITS}, not {split!r}")
    topics = pydocs_topics()
    keys = sorted(topics)
    test = list(dict.fromkeys(topics[key] for i, key in enumerate(keys) if i % TEST_EVERY == 0))
    if split == "test":
        return test
    held_out = {paragraph for text in test for paragraph in text.split(PARAGRAPH)}
    train = []
    for text in dict.fromkeys(topics[key] for i, key in enumerate(keys) if i % TEST_EVERY != 0):
        kept = [paragraph for paragraph in text.split(PARAGRAPH) if paragraph not in held_out]
        if any(paragraph.strip() for paragraph in kept):
            train.append(PARAGRAPH.join(kept))
    return train


def pydocs_origin() -> str:
    """Where the text came from, e.g. "cpython-3.11.7"."""
    return f"{platform.python_implementation().lower()}-{platform.python_version()}"
