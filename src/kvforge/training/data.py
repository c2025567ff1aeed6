"""Training and evaluation text every machine has: the Python standard library's sources,
and generated retrieval documents (a passkey, or key–value pairs, hidden in filler).

Held-out modules (`HELD_OUT`) never reach training; `kvforge eval perplexity` reads
them. Retrieval documents are generated from a seed, so a run is reproducible; their
format is shared with the `passkey` evaluation (`passkey_prompt`).
"""

import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Modules kept out of training, for held-out perplexity (present in CPython 3.9+).
HELD_OUT = ("bisect.py", "calendar.py", "csv.py", "fractions.py", "heapq.py", "json",
            "statistics.py", "textwrap.py")  # fmt: skip
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__",
                "lib2to3", "turtledemo", "ensurepip"}  # fmt: skip

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# The key follows a colon, which the filler never contains, so the model can find it by
# matching one token (an induction head); after "is" it would have to match two, since
# the filler says "is" three times a sentence group.
PASSKEY_QUESTION = "What is the pass key? The pass key is:"
# The passkey test's original form (Mohtashami & Jaggi): the reader is told first that
# something hides in the text, the key follows "is" without a colon; "chat" asks the
# question alone (a chat model answers in its own words), "text" has the answer begun.
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it "
    "and memorize it. I will quiz you about the important information there."
)
PASSKEY_FORMS = {  # form -> the question that ends the document
    "colon": PASSKEY_QUESTION,  # the form kvforge-mini was trained on
    "chat": "What is the pass key?",
    "text": "What is the pass key? The pass key is",
}
WORDS = (
    "apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "candle",
    "forest", "rocket", "silver", "garden", "window", "falcon", "copper", "meadow", "harbor",
    "violet", "glacier", "lantern", "pepper", "saddle", "thunder", "walnut", "zebra", "quartz",
)  # fmt: skip


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_sources(held_out: bool = False, root: Path | None = None) -> list[Path]:
    """The standard library's .py files (tests and tools skipped), sorted: the training
    set, or with held_out=True only the `HELD_OUT` modules."""
    root = root or stdlib_dir()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts[:-1]):
            continue
        is_held_out = rel.parts[0] in HELD_OUT
        if is_held_out == held_out:
            files.append(path)
    return files


def read_sources(files: list[Path]) -> list[str]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


@dataclass(frozen=True)
class Retrieval:
    """One generated document: `prompt` ends where the model must answer `answer`."""

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}."


def _filled(before: int, after: int, needle: str) -> str:
    return " ".join([FILLER] * before + [needle] + [FILLER] * after)


def passkey_doc(rng: random.Random, filler_repeats: int, depth: float, form: str = "colon"
                ) -> Retrieval:  # fmt: skip
    """The passkey test (Mohtashami & Jaggi, 2023): a 5-digit key in repeated filler at
    `depth` (0 = start, 1 = end), asked for at the end in `form` (`PASSKEY_FORMS`)."""
    key = str(rng.randrange(10_000, 100_000))
    before = round(filler_repeats * depth)
    if form == "colon":
        needle = f"The pass key is: {key}. Remember it. {key} is the pass key."
        return Retrieval(f"{_filled(before, filler_repeats - before, needle)}\n"
                         f"{PASSKEY_QUESTION}", key)  # fmt: skip
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    body = _filled(before, filler_repeats - before, needle)
    return Retrieval(f"{PASSKEY_INTRO}\n{body}\n{PASSKEY_FORMS[form]}", key)


def key_value_doc(rng: random.Random, filler_repeats: int, pairs: int = 4) -> Retrieval:
    """Several `key: value` facts spread through filler; one of them is asked for."""
    names = rng.sample(WORDS, pairs)
    values = [str(rng.randrange(100, 1000)) for _ in names]
    parts = [FILLER] * filler_repeats
    for name, value in zip(names, values, strict=True):
        parts.insert(rng.randrange(len(parts) + 1), f"The value of {name} is: {value}.")
    i = rng.randrange(pairs)
    return Retrieval(f"{' '.join(parts)}\nWhat is the value of {names[i]}? The value of "
                     f"{names[i]} is:", values[i])  # fmt: skip


def passkey_prompt(
    encode: Callable[[str], list[int]], tokens: int, depth: float, seed: int,
    form: str = "colon",
) -> tuple[list[int], str]:  # fmt: skip
    """(prompt token ids of about `tokens` tokens — never more —, the key) for the passkey
    evaluation at `depth`; the filler count is searched so the prompt fits. Form "chat" is
    for an `encode` that wraps the text in the model's chat template."""

    def size(repeats: int) -> int:
        return len(encode(passkey_doc(random.Random(seed), repeats, depth, form).prompt))

    low, high = 0, 1
    while size(high) <= tokens:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if size(mid) <= tokens:
            low = mid
        else:
            high = mid
    doc = passkey_doc(random.Random(seed), low, depth, form)
    return encode(doc.prompt), doc.answer
