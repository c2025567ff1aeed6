"""Comparing two cache settings on the same prompts: greedy token agreement and the mean
KL divergence of their next-token distributions (used by `kvforge eval agreement` and by
the kvquant benchmark)."""

import torch


def greedy_with_logprobs(
    llm, prompts, new_tokens: int, peaks: list[int] | None = None
) -> list[tuple[list[int], list]]:
    """Each prompt's greedy tokens and the log-probabilities each one was chosen from
    (`peaks`, if given, receives each request's peak KV tokens)."""
    from kvforge import SamplingParams

    logprobs: dict[str, list[torch.Tensor]] = {}

    def record(requests, logits):
        for r, row in zip(requests, torch.log_softmax(logits.float(), -1), strict=True):
            logprobs.setdefault(r.request_id, []).append(row.cpu())

    llm.engine.runner.logits_hook = record
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    finally:
        llm.engine.runner.logits_hook = None
    if peaks is not None:
        peaks.extend(o.metrics.peak_kv_tokens for o in outs)
    return [(o.token_ids, logprobs[o.request_id]) for o in outs]


def agreement(run, reference) -> tuple[float, float]:
    """(share of positions whose greedy token equals the reference's, mean KL(ref || run)
    over the steps whose history is still the reference's)."""
    same = total = 0
    kls = []
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(run, reference, strict=True):
        same += sum(a == b for a, b in zip(tokens, ref_tokens, strict=True))
        total += len(ref_tokens)
        for i, (lp, ref_lp) in enumerate(zip(logprobs, ref_logprobs, strict=True)):
            kls.append(float((ref_lp.exp() * (ref_lp - lp)).sum()))
            if tokens[i] != ref_tokens[i]:
                break  # later steps have another history: not comparable
    return same / total, sum(kls) / len(kls)
