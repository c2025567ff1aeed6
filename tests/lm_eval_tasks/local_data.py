"""The local tasks' questions, read from the JSONL files beside this module (whatever the
working directory of `lm_eval` is). The task configs name these loaders with
`custom_dataset: !function local_data.NAME`; lm-eval calls them with the task's metadata."""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _jsonl(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def multiple_choice(**_) -> datasets.DatasetDict:
    return _jsonl("kvforge_mc.jsonl")


def generation(**_) -> datasets.DatasetDict:
    return _jsonl("kvforge_gen.jsonl")
