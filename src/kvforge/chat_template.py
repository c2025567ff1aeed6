"""Chat messages to a prompt: the model's chat template, or kvforge's default.

A model whose tokenizer has a `chat_template` (a checkpoint's tokenizer_config.json,
or a GGUF file's `tokenizer.chat_template`) is prompted exactly as its authors
trained it, through transformers' `apply_chat_template` with the generation prompt
added. Without one — the built-in models, or a base model — kvforge uses this
documented default:

    <|system|>
    You are terse.
    <|user|>
    Hello!
    <|assistant|>

one `<|role|>` line then the content per message, ending with the assistant's
tag so the model writes the reply. `kvforge chat`, `generate --chat` and the
server's /v1/chat/completions all go through `chat_prompt`.
"""

from collections.abc import Sequence

Message = dict[str, str]  # {"role": "user", "content": "..."}


def default_chat_prompt(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return turns + "<|assistant|>\n" * add_generation_prompt


def has_chat_template(tokenizer) -> bool:
    """Whether the model's tokenizer brings its own chat template."""
    return bool(getattr(getattr(tokenizer, "hf_tokenizer", None), "chat_template", None))


def chat_prompt(tokenizer, messages: Sequence[Message],
                add_generation_prompt: bool = True) -> str | list[int]:  # fmt: skip
    """Prompt text (default template) or token ids (the tokenizer's own template)."""
    if has_chat_template(tokenizer):
        hf = tokenizer.hf_tokenizer
        ids = hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return default_chat_prompt(messages, add_generation_prompt)
