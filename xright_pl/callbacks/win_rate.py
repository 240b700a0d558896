"""A callback that measures a win rate during training: generate, score with a reward model, log.

At a validation (every ``every_n_steps`` optimizer steps at most once per multiple), the policy answers the
first ``num_prompts`` held-out prompts, a local reward model scores them against a baseline (the reference
model's answers, or the data set's chosen answers), and ``eval/win_rate`` with its 95% Wilson interval
(``eval/win_rate_ci_low``/``_high``) and the mean rewards (``eval/policy_reward``, ``eval/baseline_reward``)
are logged, plus a few sample answers as TensorBoard text (tag ``eval/samples``).

The held-out prompts are the prompt parts of the data module's tokenized validation pairs (preference data
first, else SFT; with ``data.datasets`` the first preference data set, else the first SFT one, or the one
named by ``dataset``), so they are exactly the training prompts' tokens; ``prompts`` reads a file instead.
Every process computes the same numbers (same prompts, same weights); tested on one device.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from xright_pl.core.errors import ConfigError
from xright_pl.core.types import IGNORE_INDEX
from xright_pl.data.encoding import SOURCE_ROW_COLUMN
from xright_pl.data.specs import eval_source
from xright_pl.inference.generate import eos_token_ids, generate_batch
from xright_pl.inference.judge import RewardScorer, win_rate
from xright_pl.inference.prompts import PromptEncoder, read_prompts

METRIC_KEYS = (
    "eval/win_rate",
    "eval/win_rate_ci_low",
    "eval/win_rate_ci_high",
    "eval/policy_reward",
    "eval/baseline_reward",
)


def _source_items(cfg: Any, source_rows: list[int]) -> list[Any]:
    """The prompt items (instruction text, chosen / reference answer) of rows ``source_rows`` of the held-out
    source of an ``SFTData``/``PreferenceData`` config: its eval file or split, else the training source that
    ``val_fraction`` split (row numbers count after ``limit``, as the tokenized sets' ``source_row``)."""
    path, split = eval_source(cfg) or (cfg.path, cfg.split)
    template = getattr(cfg, "prompt_template", None)
    items = read_prompts(path, cfg.format, template, max(source_rows) + 1 if source_rows else 0, split)
    return [items[i] for i in source_rows]


class WinRateCallback(Callback):
    """Win rate of the policy against a baseline on held-out prompts, judged by a local reward model.

    Args:
        reward_model: folder or hub name of an ``AutoModelForSequenceClassification`` reward model (1 output).
        num_prompts: held-out prompts answered each time (the first N of the validation data).
        every_n_steps: evaluate at the first validation on or after each multiple of this many optimizer
            steps (and at the first validation of the run).
        max_new_tokens: most tokens per generated answer.
        baseline: ``reference`` (the frozen reference model's answers, cached while it is the initial
            copy) or ``chosen`` (the data set's chosen answers; for SFT validation data, its outputs).
        prompts: a prompts file to use instead of the validation data (any format ``generate`` reads).
        batch_size: prompts per generation batch and pairs per reward-model batch.
        num_samples: answers logged as TensorBoard text each time.
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (with ``do_sample``).
        top_p: nucleus sampling mass (with ``do_sample``).
        seed: seed of sampling.
        reward_tokenizer: tokenizer of the reward model, if not in its folder.
        input_format: reward model input: auto, chat, pair or text (see ``python -m xright_pl judge``).
        reward_dtype: reward model dtype (float32, bfloat16, float16; default: its own).
        dataset: the validation data set whose prompts are answered: a name of ``data.datasets`` (or ``sft`` /
            ``dpo`` for the pair); None: the first preference data set with held-out data, else the first SFT
            one. With ``prompts`` its settings (prompt template, chat template, max prompt length) encode them.
    """

    def __init__(
        self,
        reward_model: str,
        num_prompts: int = 64,
        every_n_steps: int = 200,
        max_new_tokens: int = 64,
        baseline: Literal["reference", "chosen"] = "reference",
        prompts: str | None = None,
        batch_size: int = 16,
        num_samples: int = 3,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        reward_tokenizer: str | None = None,
        input_format: Literal["auto", "chat", "pair", "text"] = "auto",
        reward_dtype: str | None = None,
        dataset: str | None = None,
    ) -> None:
        problems = []
        if baseline not in ("reference", "chosen"):
            problems.append(f"baseline must be 'reference' or 'chosen', got {baseline!r}")
        for name, v in (("num_prompts", num_prompts), ("every_n_steps", every_n_steps), ("batch_size", batch_size)):
            if not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be an integer >= 1, got {v!r}")
        if dataset is not None and (not isinstance(dataset, str) or not dataset):
            problems.append(f"dataset must be a data set's name, got {dataset!r}")
        if max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if problems:
            raise ConfigError("Invalid WinRateCallback settings:\n  - " + "\n  - ".join(problems))
        self.reward_model = reward_model
        self.num_prompts = num_prompts
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.baseline = baseline
        self.prompts = prompts
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.sampling = {"do_sample": do_sample, "temperature": temperature, "top_p": top_p}
        self.seed = seed
        self.reward_tokenizer = reward_tokenizer
        self.input_format = input_format
        self.reward_dtype = reward_dtype
        self.dataset = dataset
        self.last_step: int | None = None
        self.last: dict[str, float] = {}
        self.samples: list[dict[str, Any]] = []
        self._scorer: RewardScorer | None = None
        self._items: tuple[list[list[int]], list[str], list[str | None]] | None = None
        self._reference_answers: list[str] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(reward_model=self.reward_model, baseline=self.baseline)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")

    # ------------------------------------------------------------------ data
    def data_sets(self, dm: Any) -> list[tuple[str, Any, str]]:
        """The candidate data sets ``(name, SFTData/PreferenceData, "sft" | "preference")`` in the order they are
        tried: ``dataset`` alone if given, else the preference data sets first, then the SFT ones."""
        if getattr(dm, "datasets", None):
            sets = [(d.name, d.sft if d.sft is not None else d.preference, d.data_kind) for d in dm.datasets]
        else:  # the pair
            sets = [("dpo", getattr(dm, "preference", None), "preference"), ("sft", getattr(dm, "sft", None), "sft")]
        if self.dataset is not None:
            chosen = [s for s in sets if s[0] == self.dataset]
            if not chosen:
                raise ConfigError(
                    f"WinRateCallback(dataset={self.dataset!r}): the data module has no such data set; it has"
                    f" {', '.join(s[0] for s in sets)}."
                )
            return chosen
        return [s for s in sets if s[2] == "preference"] + [s for s in sets if s[2] != "preference"]

    def held_out(self, trainer: pl.Trainer) -> tuple[list[list[int]], list[str], list[str | None]]:
        """(prompt token ids, instruction texts, chosen answers) of the held-out prompts (computed once)."""
        if self._items is not None:
            return self._items
        dm = trainer.datamodule
        tok = getattr(dm, "tokenizer", None)
        if tok is None:
            raise ConfigError("WinRateCallback needs the data module's tokenizer (use JointDataModule).")
        if self.prompts is not None:
            if getattr(dm, "datasets", None) or self.dataset is not None:
                spec = self.data_sets(dm)[0][1]  # prompts built as that data set's
                template, pref = getattr(spec, "prompt_template", None), spec
            else:  # the pair: the SFT template, the preference data's chat template and prompt length
                template = getattr(getattr(dm, "sft", None), "prompt_template", None)
                pref = getattr(dm, "preference", None)
            chat = bool(getattr(pref, "use_chat_template", False))
            items = read_prompts(self.prompts, "auto", template, self.num_prompts, chat=chat)
            encode = PromptEncoder(tok, getattr(pref, "max_prompt_length", None))
            ids = [encode(it.prompt) for it in items]
            self._items = (ids, [it.instruction for it in items], [it.reference for it in items])
        else:
            val = getattr(dm, "val_sets", {})
            candidates = self.data_sets(dm)
            found = next(((name, spec, kind) for name, spec, kind in candidates if name in val), None)
            if found is None:
                which = f"data set {self.dataset!r}" if self.dataset is not None else "any data set"
                raise ConfigError(
                    f"WinRateCallback found no validation data in {which}: give held-out data (eval_path or"
                    " val_fraction > 0) or a prompts file (prompts=...)."
                )
            name, spec, kind = found
            ds = val[name]
            col = "chosen_" if kind == "preference" else ""
            rows = ds.select(range(min(self.num_prompts, len(ds))))
            source = _source_items(spec, rows[SOURCE_ROW_COLUMN])
            ids, texts, chosen = [], [], []
            for row, item in zip(rows, source):
                seq, labels = list(row[f"{col}input_ids"]), list(row[f"{col}labels"])
                n = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
                ids.append(seq[:n])  # exactly the training prompt's tokens
                texts.append(item.instruction)  # what the reward model reads: the source's text, whole
                chosen.append(item.reference)
            self._items = (ids, texts, chosen)
        if self.baseline == "chosen" and any(c is None for c in self._items[2]):
            raise ConfigError(f"baseline='chosen' needs answers in the prompts file {self.prompts}; it has none.")
        return self._items

    def _answers(self, model: torch.nn.Module, tok, ids: list[list[int]]) -> list[str]:
        eos = eos_token_ids(model, tok)
        out: list[str] = []
        dev = next(model.parameters()).device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for s in range(0, len(ids), self.batch_size):
                out += generate_batch(
                    model, tok, ids[s : s + self.batch_size], self.max_new_tokens, eos_ids=eos, **self.sampling
                )
        return out

    def _reference(self, pl_module: pl.LightningModule, tok, ids: list[list[int]]) -> list[str]:
        if getattr(pl_module, "reference", None) is not None:
            return self._answers(pl_module.reference, tok, ids)
        if getattr(pl_module, "lora", None) is not None:  # LoRA: the reference is the policy, adapters off
            from xright_pl.models.lora import reference_mode

            with reference_mode(pl_module.policy) as base:
                return self._answers(base, tok, ids)
        raise ConfigError(
            "WinRateCallback(baseline='reference') needs the reference model, but the module has none (released"
            " after precompute_reference_logps). Use baseline='chosen' or turn precompute_reference_logps off."
        )

    # ------------------------------------------------------------------ hook
    def due(self, step: int) -> bool:
        return self.last_step is None or step // self.every_n_steps > self.last_step // self.every_n_steps

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.due(trainer.global_step):
            return
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Generate, score and log now; returns the logged metrics."""
        step = trainer.global_step
        tok = trainer.datamodule.tokenizer
        ids, texts, chosen = self.held_out(trainer)
        policy_answers = self._answers(pl_module.policy, tok, ids)
        if self.baseline == "chosen":
            base_answers = list(chosen)
        else:
            if self._reference_answers is None or not getattr(pl_module, "reference_is_initial", False):
                self._reference_answers = self._reference(pl_module, tok, ids)
            base_answers = self._reference_answers
        if self._scorer is None:
            self._scorer = RewardScorer(
                self.reward_model,
                self.reward_tokenizer,
                self.input_format,
                batch_size=self.batch_size,
                device=pl_module.device,
                dtype=self.reward_dtype,
            )
        n = len(ids)
        scores = self._scorer.score(texts * 2, policy_answers + base_answers)
        result = win_rate(scores[:n], scores[n:])
        self.last = {
            "eval/win_rate": result.win_rate,
            "eval/win_rate_ci_low": result.ci_low,
            "eval/win_rate_ci_high": result.ci_high,
            "eval/policy_reward": sum(scores[:n]) / n,
            "eval/baseline_reward": sum(scores[n:]) / n,
        }
        pl_module.log_dict(self.last, on_step=False, on_epoch=True, batch_size=1)
        self.samples = [
            {"instruction": q, "policy": a, "policy_reward": ps, "baseline": b, "baseline_reward": bs}
            for q, a, b, ps, bs in zip(texts, policy_answers, base_answers, scores[:n], scores[n:])
        ][: self.num_samples]
        if trainer.is_global_zero and self.samples:
            self._log_text(trainer, step)
        self.last_step = step
        return self.last

    def _log_text(self, trainer: pl.Trainer, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        parts = []
        for i, s in enumerate(self.samples):
            parts.append(
                f"**prompt {i}**: {s['instruction']}\n\n"
                f"**policy** (reward {s['policy_reward']:.3f}): {s['policy']}\n\n"
                f"**{self.baseline}** (reward {s['baseline_reward']:.3f}): {s['baseline']}"
            )
        text = "\n\n---\n\n".join(parts)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("eval/samples", text, global_step=step)
