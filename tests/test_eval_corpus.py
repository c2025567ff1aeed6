"""What `kvforge eval` reads and asks on a real model: the prose corpus (the Python
documentation's reST sources, markup taken out), the passkey test's forms, and the
default grid on SmolLM2 through its chat template."""

import json
import re

import pytest

from kvforge import LLM
from kvforge.cli import main
from kvforge.errors import KVForgeError
from kvforge.eval import corpus, tasks
from kvforge.training.data import PASSKEY_INTRO, passkey_doc, passkey_prompt

REST = """\
Design and History FAQ
======================

.. only:: html

   .. contents::

Why does Python use *indentation*?
----------------------------------

Guido van Rossum believes that using :term:`indentation` is **elegant**; see
:func:`len <builtins.len>` and ``x++`` or `the tutorial <https://x.y/>`_ here::

   if (x <= y)
           x++;

>>> print(1)
1

Short title
"""


def test_rest_prose_keeps_paragraphs_and_takes_the_markup_out():
    assert corpus.rest_prose(REST) == (
        "Design and History FAQ\n"
        "Why does Python use indentation?\n"
        "Guido van Rossum believes that using indentation is elegant; see len and x++ or "
        "the tutorial here:"
    )


def test_the_prose_corpus_is_the_python_docs_english(monkeypatch):
    text = corpus.prose_text()
    assert len(text.split()) > 50_000
    assert "Guido van Rossum" in text and "the tutorial" in text.lower()
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith((".. ", ">>>", "   "))]
    assert not [line for line in lines if re.search(r":\w+:`|``", line)]
    monkeypatch.setattr(corpus, "PROSE_ROOTS", ())
    with pytest.raises(KVForgeError, match=r"apt-get install python3\.11-doc"):
        corpus.prose_text()


def test_passkey_forms_and_the_prompt_size():
    import random

    text = passkey_doc(random.Random(1), 2, 0.5, "chat")
    key = text.answer
    assert text.prompt == (
        f"{PASSKEY_INTRO}\nThe grass is green. The sky is blue. The sun is yellow. Here we go. "
        f"There and back again. The pass key is {key}. Remember it. {key} is the pass key. "
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
        "again.\nWhat is the pass key?"
    )
    assert passkey_doc(random.Random(1), 2, 0.5, "text").prompt.endswith(
        "What is the pass key? The pass key is"
    )
    assert f"The pass key is: {key}." in passkey_doc(random.Random(1), 2, 0.5).prompt

    def encode(s):
        return s.split()

    ids, _ = passkey_prompt(encode, 300, 0.25, 7, "chat")
    assert 300 - 20 < len(ids) <= 300  # a filler sentence group is 19 words


@pytest.fixture(scope="module")
def smollm2():
    return LLM(device="cpu", kv_memory="128MiB", max_num_batched_tokens=2048)


def test_passkey_on_smollm2_asks_through_its_chat_template(smollm2):
    assert tasks.default_form(smollm2) == "chat"
    assert tasks.default_lengths(smollm2) == (1024, 2048, 4096, 8168)  # 8K, answer included
    result = tasks.passkey(smollm2, lengths=(1024,), depths=(0.0,), trials=1)
    assert result["form"] == "chat" and result["accuracy"] == [[1.0]]
    # the prompt (within a filler sentence group of 1,024 tokens) and the reply
    assert 1024 - 24 < result["peak_kv_tokens"]["1024"] <= 1024 + tasks.CHAT_ANSWER_TOKENS
    text = tasks.passkey(smollm2, lengths=(1024,), depths=(1.0,), trials=1, form="text")
    assert text["accuracy"] == [[1.0]] and text["first_miss"] == {}


def test_perplexity_corpora_and_form_errors(capsys):
    args = ["eval", "perplexity", "--model", "kvforge-mini", "--device", "cpu",
            "--max-tokens", "40", "--context", "32", "--json"]  # fmt: skip
    assert main([*args, "--corpus", "code"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "held-out stdlib modules" and data["tokens_scored"] == 40
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["source"].startswith("prose: Python docs")
    assert main(["eval", "passkey", "--model", "kvforge-mini", "--device", "cpu",
                 "--form", "chat", "--lengths", "64"]) == 2  # fmt: skip
    assert "passkey form 'chat' needs a model with a chat template" in capsys.readouterr().err
