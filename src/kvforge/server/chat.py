"""Chat messages to a prompt: the tokenizer's chat template, or kvforge's default.

A checkpoint whose tokenizer_config.json has a `chat_template` is prompted
exactly as its authors trained it (through transformers' `apply_chat_template`,
with the generation prompt added). Without one — the built-in model, or a base
model — kvforge uses this documented default:

    <|system|>
    You are terse.
    <|user|>
    Hello!
    <|assistant|>

one `<|role|>` line then the content per message, ending with the assistant's
tag so the model writes the reply.
"""

from kvforge.server.protocol import ChatMessage


def default_chat_prompt(messages: list[ChatMessage]) -> str:
    turns = "".join(f"<|{m.role}|>\n{m.text}\n" for m in messages)
    return turns + "<|assistant|>\n"


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str | list[int]:
    """Prompt text (default template) or token ids (the tokenizer's own template)."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None and getattr(hf, "chat_template", None):
        ids = hf.apply_chat_template(
            [{"role": m.role, "content": m.text} for m in messages],
            add_generation_prompt=True,
            tokenize=True,
        )
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return default_chat_prompt(messages)
