"""``python -m xright_pl judge``: a local win rate of a model's answers against a baseline, by a reward model.

Both answer sets are scored by one Hugging Face reward model (``AutoModelForSequenceClassification`` with a
single output); a prompt is a win when the policy's answer scores higher than the baseline's, a tie counts
half. The win rate comes with a 95% Wilson score interval computed on ``(wins + ties / 2) / n``: ties have
less variance than the Bernoulli outcome the interval assumes, so with ties the interval is conservative.

The baseline is a second answers file (e.g. the reference model's answers from ``python -m xright_pl
generate --reference true``) or a data file whose answers are the baseline (the ``chosen`` answers of a
preference file, the outputs of an SFT file). Answers are matched to each other by instruction text (the
k-th occurrence of an instruction in one file with the k-th in the other).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from xright_pl.core.errors import DataError
from xright_pl.inference.answers import write_json_atomic
from xright_pl.inference.prompts import read_prompts
from xright_pl.models.build import _DTYPES, ModelError

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


# ------------------------------------------------------------------------------------------ statistics


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may be fractional: ties = 0.5)."""
    if n <= 0:
        raise ValueError("the Wilson interval needs n >= 1")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass
class WinRate:
    """Outcome counts of paired comparisons and the win rate (ties half) with its 95% Wilson interval."""

    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    ci_low: float
    ci_high: float


def win_rate(policy_scores: list[float], baseline_scores: list[float]) -> WinRate:
    """Compare scores prompt by prompt: win if policy > baseline, tie if equal (counts half), else loss."""
    if len(policy_scores) != len(baseline_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(baseline_scores)} baseline scores")
    wins = sum(p > b for p, b in zip(policy_scores, baseline_scores))
    ties = sum(p == b for p, b in zip(policy_scores, baseline_scores))
    n = len(policy_scores)
    if n == 0:
        raise ValueError("no scores to compare")
    lo, hi = wilson_interval(wins + ties / 2, n)
    return WinRate(n, wins, ties, n - wins - ties, (wins + ties / 2) / n, lo, hi)


def outcome(policy_score: float, baseline_score: float) -> float:
    """1 for a win, 0.5 for a tie, 0 for a loss."""
    return 1.0 if policy_score > baseline_score else 0.5 if policy_score == baseline_score else 0.0


# ------------------------------------------------------------------------------------------ reward model

_TURN = re.compile(r"(?:^|\n\n|\s)(Human|Assistant):[ \t]?")


def instruction_to_messages(instruction: str) -> list[dict]:
    """An HH-style transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, as written by ``generate`` for
    chat prompts and found in HH data) as chat messages without the trailing empty assistant turn; any other
    text is one user message."""
    if not instruction.lstrip().startswith("Human:"):
        return [{"role": "user", "content": instruction}]
    parts = _TURN.split(instruction.strip())
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    roles = [m["role"] for m in msgs]
    if not msgs or roles[0] != "user" or any(a == b for a, b in zip(roles, roles[1:])):
        return [{"role": "user", "content": instruction}]
    return msgs


class RewardScorer:
    """Scores ``(instruction, answer)`` pairs with a Hugging Face reward model (one output logit).

    Args:
        path: folder or hub name of an ``AutoModelForSequenceClassification`` with ``num_labels == 1``.
        tokenizer: its tokenizer, if not in ``path``.
        input_format: how a pair becomes the model's input: ``chat`` (the tokenizer's chat template over
            user/assistant messages; HH transcripts are split into turns), ``pair`` (a text pair, as
            cross-encoder reward models such as DeBERTa ones expect), ``text`` (``"\\n\\nHuman: {instruction}
            \\n\\nAssistant: {answer}"``), or ``auto`` (chat when the tokenizer has a chat template, else text).
        max_length: most tokens per input; longer inputs lose their start (the answer is kept). Default: the
            model's ``max_position_embeddings`` (or the tokenizer's limit), at most 4096.
        batch_size: pairs per forward pass.
        device: default cuda when available.
        dtype: float32, bfloat16 or float16 (default: the model's own).
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        input_format: Literal["auto", "chat", "pair", "text"] = "auto",
        max_length: int | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from xright_pl.core.assets import resolve

        if dtype not in _DTYPES:
            raise ModelError(f"dtype must be one of {sorted(k for k in _DTYPES if k)}, got {dtype!r}")
        if input_format not in ("auto", "chat", "pair", "text"):
            raise ModelError(f"input_format must be auto, chat, pair or text, got {input_format!r}")
        path = os.path.expanduser(resolve(path))
        kwargs = {"dtype": _DTYPES[dtype]} if dtype else {}
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, trust_remote_code=trust_remote_code, **kwargs
            )
            self.tok = AutoTokenizer.from_pretrained(
                os.path.expanduser(resolve(tokenizer or path)), trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise ModelError(
                f"reward model {path!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0]}). Give a "
                "folder or hub name of an AutoModelForSequenceClassification reward model with its tokenizer."
            ) from None
        if self.model.config.num_labels != 1:
            raise ModelError(
                f"reward model {path!r} has {self.model.config.num_labels} outputs (num_labels); a reward model "
                "gives one score per input (num_labels=1). Use a reward model, not a classifier."
            )
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or self.tok.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.tok.padding_side = "right"
        self.tok.truncation_side = "left"
        if input_format == "auto":
            input_format = "chat" if getattr(self.tok, "chat_template", None) else "text"
        self.input_format = input_format
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tok.model_max_length, 4096]
        self.max_length = max_length or min(int(x) for x in limits if x)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.name = path

    def to(self, device: str | torch.device) -> RewardScorer:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def encode(self, instructions: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """The padded model inputs of a batch of pairs."""
        kw: dict[str, Any] = dict(truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        if self.input_format == "pair":
            return self.tok(instructions, answers, **kw)
        if self.input_format == "chat":
            texts = [
                self.tok.apply_chat_template(
                    instruction_to_messages(q) + [{"role": "assistant", "content": a}], tokenize=False
                )
                for q, a in zip(instructions, answers)
            ]
            return self.tok(texts, add_special_tokens=False, **kw)
        texts = []
        for q, a in zip(instructions, answers):
            head = q if q.lstrip().startswith("Human:") and q.rstrip().endswith("Assistant:") else None
            head = head if head is not None else f"\n\nHuman: {q}\n\nAssistant:"
            texts.append(f"{head} {a}")
        return self.tok(texts, **kw)

    @torch.no_grad()
    def score(self, instructions: list[str], answers: list[str], progress: bool = False) -> list[float]:
        """One reward per ``(instruction, answer)`` pair, in float32."""
        from tqdm.auto import tqdm

        # Each distinct pair is scored once, so identical answers get identical scores (an exact tie) whatever
        # the batch they would have been padded in.
        unique = list(dict.fromkeys(zip(instructions, answers)))
        scores: list[float] = []
        steps = range(0, len(unique), self.batch_size)
        for s in tqdm(steps, desc="judge", unit="batch", disable=not progress):
            chunk = unique[s : s + self.batch_size]
            enc = self.encode([q for q, _ in chunk], [a for _, a in chunk])
            enc = {k: v.to(self.device) for k, v in enc.items()}
            scores += self.model(**enc).logits[:, 0].float().cpu().tolist()
        table = dict(zip(unique, scores))
        return [table[pair] for pair in zip(instructions, answers)]


# ------------------------------------------------------------------------------------------ matching


def pair_answers(policy: list[tuple[str, str]], baseline: list[tuple[str, str]]) -> tuple[list[tuple[int, int]], int]:
    """Match ``(instruction, answer)`` lists by instruction (k-th occurrence with k-th occurrence).

    Returns the matched ``(policy index, baseline index)`` pairs in policy order, and how many policy
    answers found no baseline answer.
    """
    queue: dict[str, deque[int]] = defaultdict(deque)
    for j, (q, _) in enumerate(baseline):
        queue[q].append(j)
    pairs, unmatched = [], 0
    for i, (q, _) in enumerate(policy):
        if queue[q]:
            pairs.append((i, queue[q].popleft()))
        else:
            unmatched += 1
    return pairs, unmatched


def _answers(path: str, fmt: str, template: str | None, limit: int | None, role: str) -> list[tuple[str, str]]:
    items = read_prompts(path, fmt, template, limit)
    missing = [it.prompt_id for it in items if it.reference is None]
    if missing:
        raise DataError(
            f"{path}: rows {missing[:5]} have no answer, so it cannot be the {role}. Give an answers file "
            "(instruction + output, as written by `python -m xright_pl generate`), a preference file (its "
            "chosen answers) or an SFT file (its outputs)."
        )
    return [(it.instruction, it.reference) for it in items]


def _generator(path: str) -> str:
    from xright_pl.inference.answers import read_answers

    try:
        rows = read_answers(path) if path.endswith(".json") else []
    except DataError:
        rows = []
    names = {r.get("generator") for r in rows if isinstance(r.get("generator"), str)}
    return names.pop() if len(names) == 1 else Path(path).stem


def format_table(summary: dict[str, Any]) -> str:
    """The printed summary of a judgement."""
    rows = [
        ("policy", f"{summary['policy_generator']} ({summary['policy']})"),
        ("baseline", f"{summary['baseline_generator']} ({summary['baseline']})"),
        ("reward model", summary["reward_model"]),
        ("prompts judged", f"{summary['n']} (unmatched policy answers: {summary['unmatched']})"),
        ("wins / ties / losses", f"{summary['wins']} / {summary['ties']} / {summary['losses']}"),
        (
            "win rate",
            f"{summary['win_rate']:.4f}  95% CI [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}] "
            "(Wilson, ties count half)",
        ),
        ("mean reward", f"policy {summary['policy_mean_score']:.4f}, baseline {summary['baseline_mean_score']:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "xright_pl judge", "-" * (width + 40)] + [f"{k.ljust(width)} : {v}" for k, v in rows]
    if summary.get("scores_path"):
        lines.append(f"per-prompt scores: {summary['scores_path']}; summary: {summary['summary_path']}")
    return "\n".join(lines)


def judge(
    policy: str,
    baseline: str,
    reward_model: str,
    output_dir: str | None = None,
    baseline_format: str = "auto",
    prompt_template: str | None = None,
    limit: int | None = None,
    reward_tokenizer: str | None = None,
    input_format: Literal["auto", "chat", "pair", "text"] = "auto",
    max_length: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model's answers and a baseline's with a reward model; report the win rate with a 95% CI.

    A prompt is a win when the policy's answer gets the higher reward; ties count half. The interval is the
    Wilson score interval of ``(wins + ties / 2) / n``. Writes ``scores.json`` (per prompt: instruction,
    both answers, both scores, outcome) and ``summary.json`` to ``output_dir`` and prints a table.

    Args:
        policy: the answers to judge: a file written by ``python -m xright_pl generate`` (AlpacaEval format).
        baseline: the answers to compare with: another answers file (e.g. the reference model's, from
            ``generate --reference true``), or a data file: a preference file (its ``chosen`` answers) or an
            SFT file (its outputs). Matched to the policy's answers by instruction.
        reward_model: folder or hub name of an ``AutoModelForSequenceClassification`` reward model (1 output).
        output_dir: where to write scores.json and summary.json (default: ``judge_<policy>_vs_<baseline>``
            next to the policy file).
        baseline_format: format of a baseline data file (auto, alpaca, prompt_completion, messages,
            prompt_chosen_rejected, hh, conversational).
        prompt_template: only to read a baseline SFT file whose instructions were templated in generation.
        limit: judge only the first N policy answers.
        reward_tokenizer: tokenizer of the reward model, if not in its folder.
        input_format: reward model input: auto (chat template if any, else text), chat, pair or text.
        max_length: most tokens per reward-model input (the start of the prompt is cut first).
        batch_size: pairs per reward-model forward pass.
        device: default cuda when available.
        dtype: reward model dtype: float32, bfloat16, float16 (default: its own).
        trust_remote_code: allow custom model code from the hub.
        progress: show a progress bar.

    Returns:
        The summary: n, wins, ties, losses, win_rate, ci_low, ci_high, ci_method, mean scores, paths.
    """
    pol = _answers(policy, "auto", None, limit, "policy")
    base = _answers(baseline, baseline_format, prompt_template, None, "baseline")
    pairs, unmatched = pair_answers(pol, base)
    if not pairs:
        raise DataError(
            f"no instruction of {policy} is found in {baseline}: the two files answer different prompts. "
            "Generate both from the same prompts file (answers are matched by instruction text)."
        )
    scorer = RewardScorer(reward_model, reward_tokenizer, input_format, max_length, batch_size, device, dtype,
                          trust_remote_code)  # fmt: skip
    questions = [pol[i][0] for i, _ in pairs]
    n = len(pairs)
    scores = scorer.score(questions * 2, [pol[i][1] for i, _ in pairs] + [base[j][1] for _, j in pairs], progress)
    p_scores, b_scores = scores[:n], scores[n:]
    result = win_rate(p_scores, b_scores)
    per_prompt = [
        {
            "instruction": q,
            "policy_output": pol[i][1],
            "baseline_output": base[j][1],
            "policy_score": ps,
            "baseline_score": bs,
            "outcome": outcome(ps, bs),
        }
        for (i, j), q, ps, bs in zip(pairs, questions, p_scores, b_scores)
    ]
    if output_dir is None:
        output_dir = str(Path(policy).resolve().parent / f"judge_{Path(policy).stem}_vs_{Path(baseline).stem}")
    summary: dict[str, Any] = {
        **asdict(result),
        "ci_method": "wilson95_ties_half",
        "unmatched": unmatched,
        "policy_mean_score": sum(p_scores) / len(p_scores),
        "baseline_mean_score": sum(b_scores) / len(b_scores),
        "policy": policy,
        "baseline": baseline,
        "policy_generator": _generator(policy),
        "baseline_generator": _generator(baseline),
        "reward_model": reward_model,
        "input_format": scorer.input_format,
        "scores_path": os.path.join(output_dir, "scores.json"),
        "summary_path": os.path.join(output_dir, "summary.json"),
    }
    write_json_atomic(summary["scores_path"], per_prompt)
    write_json_atomic(summary["summary_path"], summary)
    print(format_table(summary), flush=True)
    return summary
