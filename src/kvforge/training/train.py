"""Train kvforge's built-in model: a small Llama (GQA) on Python sources and retrieval
documents, on a CPU in under an hour.

    python -m kvforge.training.train --out runs/default            # the shipped model
    python -m kvforge.training.train --out runs/default --resume   # after an interruption

Reproducible: the tokenizer is trained on a fixed sample, and the batch of step s is
drawn from a generator seeded by (seed, s), so a resumed run sees exactly the batches
an uninterrupted one would. A checkpoint (weights, optimizer, step, loss log) is written
every `--checkpoint-every` steps and at the end. The result is an HF-format directory
(config.json, model.safetensors, tokenizer files) that kvforge and transformers load.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvforge.training.data import (
    key_value_doc,
    passkey_doc,
    python_sources,
    read_sources,
)

BOS, EOS = "<|bos|>", "<|eos|>"


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    max_position_embeddings: int = 2048
    seq_len: int = 1024
    batch_size: int = 8
    long_every: int = 8  # every n-th step trains at max_position_embeddings (batch scaled)
    # Stage 1, a curriculum: short sequences of repeated random spans only, until the
    # model copies from its context (an induction head). Mixed from the start, a model
    # this small never learns to (four runs of 900 steps showed no copying at all);
    # alone, copying appears after ~1,500 short steps, and retrieval builds on it.
    copy_steps: int = 2000
    copy_seq_len: int = 128
    copy_batch_size: int = 16
    copy_lr: float = 1e-3
    steps: int = 900  # stage 2: the mix below
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 40
    weight_decay: float = 0.1
    copy_share: float = 0.2  # sequences of one random token span, repeated
    retrieval_share: float = 0.5  # sequences that open with a retrieval document
    passkey_share: float = 0.8  # of those, passkey (the rest key-value)
    answer_weight: float = 10.0  # loss weight of a retrieval answer's tokens (the rare signal)
    seed: int = 0
    checkpoint_every: int = 50
    tokenizer_chars: int = 4_000_000  # of Python text the tokenizer is trained on
    max_files: int | None = None  # fewer source files (tests)


# --- tokenizer ----------------------------------------------------------------------------


def train_tokenizer(config: TrainConfig, texts: list[str]):
    """A byte-level BPE tokenizer (tokenizers), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(config.seed)
    sample, size = [], 0
    for text in rng.sample(texts, len(texts)):
        if size >= config.tokenizer_chars:
            break
        sample.append(text)
        size += len(text)
    sample += [passkey_doc(rng, rng.randrange(1, 20), rng.random()).text for _ in range(200)]
    sample += [key_value_doc(rng, rng.randrange(1, 20)).text for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )  # fmt: skip


# --- data ---------------------------------------------------------------------------------


class Batches:
    """The batch of step s, a pure function of (seed, s): token ids [batch, length]."""

    def __init__(self, config: TrainConfig, tokenizer, code: torch.Tensor) -> None:
        self.config, self.tokenizer, self.code = config, tokenizer, code
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.vocab = len(tokenizer)

    def shape(self, step: int) -> tuple[int, int]:
        c = self.config
        if step < c.copy_steps:
            return c.copy_batch_size, c.copy_seq_len
        step -= c.copy_steps
        if c.long_every and step % c.long_every == c.long_every - 1:
            length = c.max_position_embeddings
            return max(1, c.batch_size * c.seq_len // length), length
        return c.batch_size, c.seq_len

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [batch, length], loss weight of each next-token target [batch, length-1]:
        1, or `answer_weight` on the tokens of a retrieval document's answer)."""
        c = self.config
        rng = random.Random(c.seed * 1_000_003 + step)
        batch, length = self.shape(step)
        rows, weights = [], []
        for _ in range(batch):
            ids = [self.bos]
            weight = [1.0] * (length - 1)
            kind = 0.0 if step < c.copy_steps else rng.random()
            if kind < c.copy_share:
                # a random token span, repeated: every repeat is predictable only by
                # copying from earlier in the context (what retrieval needs, densely)
                longest = min(64, length // 4)
                span = [rng.randrange(2, self.vocab) for _ in range(rng.randrange(8, longest + 1))]
                while len(ids) < length:
                    ids += span
                rows.append(ids[:length])
                weights.append(weight)
                continue
            if kind < c.copy_share + c.retrieval_share:
                # filler repeats are 24 tokens: leave room for the needle, question, answer
                repeats = rng.randrange(1, max(2, (length - 64) // 24))
                if rng.random() < c.passkey_share:
                    doc = passkey_doc(rng, repeats, rng.random())
                else:
                    doc = key_value_doc(rng, repeats, pairs=rng.randrange(2, 6))
                prompt = self.tokenizer.encode(doc.prompt, add_special_tokens=False)
                text = self.tokenizer.encode(doc.text, add_special_tokens=False)[: length - 2]
                answer = len(self.tokenizer.encode(" " + doc.answer, add_special_tokens=False))
                for i in range(len(prompt), min(len(text), len(prompt) + answer)):
                    weight[i] = c.answer_weight  # target i+1 of the row is text[i]
                ids += text
                ids.append(self.eos)
            need = length - len(ids)
            if need > 0:
                start = rng.randrange(0, self.code.numel() - need)
                ids += self.code[start : start + need].tolist()
            rows.append(ids[:length])
            weights.append(weight)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(weights)


def encode_code(tokenizer, texts: list[str]) -> torch.Tensor:
    """All training sources as one stream of token ids, each file closed by EOS."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


# --- model --------------------------------------------------------------------------------


def build_model(config: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    hf = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf)


def total_steps(config: TrainConfig) -> int:
    return config.copy_steps + config.steps


def learning_rate(config: TrainConfig, step: int) -> float:
    """Warm-up then constant `copy_lr` in stage 1; warm-up then cosine in stage 2."""
    if step < config.copy_steps:
        return config.copy_lr * min(1.0, (step + 1) / config.warmup)
    step -= config.copy_steps
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


# --- the run ------------------------------------------------------------------------------


def train(config: TrainConfig, out: Path, resume: bool = False, log=print,
          stop_after: int | None = None) -> dict:  # fmt: skip
    """Train (or resume) into `out`; returns the training record (losses, timings).
    `stop_after`: checkpoint and return after that many steps (resume later)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    texts = read_sources(python_sources()[: config.max_files])
    tok_dir = out / "tokenizer"
    if resume and tok_dir.exists():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tokenizer = train_tokenizer(config, texts)
        tokenizer.save_pretrained(str(tok_dir))
    code = encode_code(tokenizer, texts)
    batches = Batches(config, tokenizer, code)
    model = build_model(config, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    record = {"config": dataclasses.asdict(config), "code_tokens": code.numel(),
              "steps": [], "loss": [], "seconds": 0.0}  # fmt: skip
    state_path = out / "train_state.pt"
    start = 0
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        record, start = state["record"], state["step"]
        log(f"resumed at step {start}")
    model.train()
    total = total_steps(config)
    end = total if stop_after is None else min(total, stop_after)
    for step in range(start, end):
        ids, weights = batches(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        logits = model(input_ids=ids).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(weights.shape)
        loss = per_token.mean()  # what the curve shows: plain next-token loss
        optimizer.zero_grad(set_to_none=True)
        ((per_token * weights).sum() / weights.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        record["steps"].append(step)
        record["loss"].append(round(loss.item(), 4))
        if step % 10 == 0 or step == total - 1:
            elapsed = record["seconds"] + time.perf_counter() - started
            log(f"step {step:5d}  loss {loss.item():.3f}  shape {tuple(ids.shape)}  "
                f"{elapsed / 60:.1f} min")  # fmt: skip
        done = step + 1
        if done % config.checkpoint_every == 0 or done in (total, end):
            record_now = {**record, "seconds": record["seconds"] + time.perf_counter() - started}
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "record": record_now, "step": done}, state_path)  # fmt: skip
    record["seconds"] += time.perf_counter() - started
    if end == total:
        export(model, tokenizer, out / "model", record)
    return record


def export(model, tokenizer, directory: Path, record: dict) -> None:
    """The HF checkpoint kvforge ships: fp32 safetensors, tokenizer, training record."""
    directory.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "training.json").write_text(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train kvforge's built-in model.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, help="checkpoint and stop after N steps")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "max_files":
            parser.add_argument("--max-files", type=int)
            continue
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default),
                            default=field.default)  # fmt: skip
    args = parser.parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    record = train(config, args.out, resume=args.resume, stop_after=args.stop_after)
    if len(record["loss"]) < total_steps(config):
        print(f"stopped after {len(record['loss'])} steps; --resume goes on")
        return 0
    print(f"done: {len(record['loss'])} steps in {record['seconds'] / 60:.1f} min, "
          f"final loss {record['loss'][-1]:.3f}; model in {args.out / 'model'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
