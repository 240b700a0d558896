"""The optima ``f_sft*`` and ``f_dpo*``: measure them, write them to a file, read them back.

``f_sft*`` is the final ``val/sft_loss`` of an SFT-only run and ``f_dpo*`` the final ``val/dpo_loss`` of a
DPO-only run, from the same start (model, reference, data) and with the same budget as the joint run. Both
are the validation losses the module logs, so they use exactly the training normalisation: token-mean NLL over
the response tokens of the whole validation set (SFT), mean sigmoid DPO loss over its pairs with the run's
``beta`` (DPO).

``python -m xright_pl optimum`` runs the two single-objective fits from configs (by default the demo's
``builtin:configs/demo/sft_only.yaml`` and ``dpo_only.yaml``, shipped in the package), or reads the
``summary.json`` of runs you already have, and writes a small JSON file::

    {"f_sft_star": 0.39, "f_dpo_star": 0.17, "beta": 0.1, "sources": {...}}

that ``Maxright(optimum_file=...)`` and ``TradeoffMetrics(optimum_file=...)`` read, so nobody copies numbers
by hand.

With more than two objectives (a config with ``data.datasets``) ``f_k*`` is the final ``val/{k}_loss`` of a
``Single(objective=k)`` run, one per data set, and the file holds them by name (:class:`OptimumK`)::

    {"f_star": {"terse": 0.52, "polite": 0.08, "prefs": 0.19}, "beta": 0.1, "sources": {...}}

``beta`` is the DPO ``beta`` of the runs when a preference data set was measured, else null.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xright_pl.core.assets import resolve
from xright_pl.core.errors import ConfigError

#: The validation metric that gives each objective's optimum, and the selector that must have produced it.
METRIC = {"sft": "val/sft_loss", "dpo": "val/dpo_loss"}
SINGLE = {"sft": "sft_only", "dpo": "dpo_only"}
#: The default single-objective configs: packaged copies of the repository's ``configs/demo/*_only.yaml``
#: (``xright_pl/assets/configs/demo/``, kept identical by a test), so the command works from any folder.
DEFAULT_CONFIG = {"sft": "builtin:configs/demo/sft_only.yaml", "dpo": "builtin:configs/demo/dpo_only.yaml"}


@dataclass(frozen=True)
class Optimum:
    """The optimum of each objective, in the training normalisation.

    Attributes:
        f_sft: lowest reachable SFT loss (token-mean NLL of validation responses).
        f_dpo: lowest reachable DPO loss (pair-mean sigmoid loss of validation pairs).
        beta: the DPO ``beta`` ``f_dpo`` was measured with (None: unknown).
        source: where the values came from (a file path, ``"arguments"``, ...).
        sources: details of the runs that measured them (config, summary path, steps, fingerprint).
    """

    f_sft: float
    f_dpo: float
    beta: float | None = None
    source: str = "arguments"
    sources: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The file format (see :func:`write_optimum`)."""
        return {"f_sft_star": self.f_sft, "f_dpo_star": self.f_dpo, "beta": self.beta, "sources": self.sources}

    def check_beta(self, beta: float) -> None:
        """Raise :class:`ConfigError` if ``f_dpo`` was measured with another DPO ``beta`` than ``beta``."""
        _check_beta(self.beta, beta, self.source, "python -m xright_pl optimum")


@dataclass(frozen=True)
class OptimumK:
    """The optima of named objectives (the data sets of a ``data.datasets`` run), in the training normalisation.

    Attributes:
        f_star: ``{name: f_k*}``, the lowest reachable validation loss of each data set's objective.
        beta: the DPO ``beta`` the preference data sets were measured with (None: unknown, or none measured).
        source: where the values came from (a file path, ``"summaries"``, ...).
        sources: details of the runs that measured them, by name.
    """

    f_star: dict[str, float]
    beta: float | None = None
    source: str = "arguments"
    sources: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The file format (see :func:`write_optimum`)."""
        return {"f_star": dict(self.f_star), "beta": self.beta, "sources": self.sources}

    def check_beta(self, beta: float) -> None:
        """Raise :class:`ConfigError` if the preference optima were measured with another DPO ``beta``."""
        _check_beta(self.beta, beta, self.source, "python -m xright_pl optimum --datasets_config ...")


def given_optimum(
    pair: Optimum | None, named: OptimumK | None, f_star: Mapping[str, float] | None
) -> Optimum | OptimumK | None:
    """The optima a callback was configured with: the pair's, else a named file's, else ``f_star`` by name."""
    if pair is not None:
        return pair
    if named is not None:
        return named
    return OptimumK(dict(f_star)) if f_star is not None else None


def _check_beta(measured: float | None, beta: float, source: str, command: str) -> None:
    """Raise :class:`ConfigError` if the optima of ``source``, measured at DPO beta ``measured`` (None: unknown), are
    used at ``beta``."""
    if measured is not None and not math.isclose(measured, float(beta), rel_tol=1e-6):
        raise ConfigError(
            f"the optima in {source} were measured with DPO beta={measured}, but this run uses beta={beta}: the DPO"
            f" loss depends on beta, so its f* does not apply. Re-measure them with `{command}` at beta={beta}, or"
            f" set --model.beta {measured}."
        )


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def load_optimum(path: str | os.PathLike) -> Optimum | OptimumK:
    """Read an optimum file written by :func:`write_optimum`: the pair's (JSON with ``f_sft_star`` and
    ``f_dpo_star``: an :class:`Optimum`) or named objectives' (``f_star: {name: value}``: an :class:`OptimumK`).

    ``builtin:demo/optimum.json`` is the embedded task's (see :mod:`xright_pl.core.assets`)."""
    p = Path(resolve(str(path)))
    if not p.is_file():
        raise ConfigError(
            f"optimum file {str(p)!r} not found (relative paths are relative to the working directory"
            f" {os.getcwd()!r}). Create it with `python -m xright_pl optimum --out {p}`."
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"optimum file {str(p)!r} is not valid JSON ({e}); regenerate it.") from None
    problems = []
    values = {}
    if isinstance(data, dict) and "f_star" in data:
        return _load_k(p, data)
    for key in ("f_sft_star", "f_dpo_star"):
        v = data.get(key) if isinstance(data, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            problems.append(f"field {key!r} must be a finite number, got {v!r}")
        else:
            values[key] = float(v)
    beta = data.get("beta") if isinstance(data, dict) else None
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta <= 0):
        problems.append(f"field 'beta' must be a number > 0 or null, got {beta!r}")
    if problems:
        raise ConfigError(f"optimum file {str(p)!r}: " + "; ".join(problems) + ". Regenerate it.")
    return Optimum(
        values["f_sft_star"],
        values["f_dpo_star"],
        None if beta is None else float(beta),
        source=str(p),
        sources=data.get("sources") or {},
    )


def _load_k(p: Path, data: dict[str, Any]) -> OptimumK:
    """The :class:`OptimumK` of a parsed file ``p`` with ``f_star`` (every problem reported at once)."""
    problems = []
    stars = data["f_star"]
    if not isinstance(stars, dict) or not stars:
        problems.append(f"field 'f_star' must be a non-empty mapping {{name: value}}, got {stars!r}")
        stars = {}
    for name, v in stars.items():
        if not _finite(v):
            problems.append(f"f_star[{name!r}] must be a finite number, got {v!r}")
    beta = data.get("beta")
    if beta is not None and (not _finite(beta) or beta <= 0):
        problems.append(f"field 'beta' must be a number > 0 or null, got {beta!r}")
    if problems:
        raise ConfigError(f"optimum file {str(p)!r}: " + "; ".join(problems) + ". Regenerate it.")
    return OptimumK(
        {str(k): float(v) for k, v in stars.items()},
        None if beta is None else float(beta),
        source=str(p),
        sources=data.get("sources") or {},
    )


def write_optimum(optimum: Optimum | OptimumK, path: str | os.PathLike) -> Path:
    """Write ``optimum`` as JSON to ``path`` (atomically; folders created). Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(optimum.as_dict(), indent=2) + "\n")
    os.replace(tmp, p)
    return p


def read_summary(path: str | os.PathLike, objective: str, prefix: str = "val") -> tuple[float, dict[str, Any]]:
    """The optimum of ``objective`` from the ``summary.json`` of a single-objective run, and its provenance.

    ``objective`` is ``sft``, ``dpo`` or a data set's name: the run's selector must be ``{objective}_only``
    (``Single(objective=...)``) and its optimum is its final ``val/{objective}_loss`` (``prefix`` ``held_in``:
    ``held_in/{objective}_loss``, on the held-in sample of training rows of ``data.held_in``)."""
    single, metric = SINGLE.get(objective, f"{objective}_only"), METRIC.get(objective, f"val/{objective}_loss")
    if prefix != "val":
        metric = prefix + metric[metric.index("/") :]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"summary file {str(p)!r} not found: give the summary.json of a finished run.")
    try:
        summary = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"summary file {str(p)!r} is not valid JSON ({e}).") from None
    if summary.get("selector") != single:
        raise ConfigError(
            f"{str(p)!r} is the summary of a {summary.get('selector')!r} run, but f_{objective}* must come from"
            f" a {single!r} run (selector xright_pl.Single with objective: {objective})."
        )
    value = summary.get(metric)
    if not _finite(value):
        raise ConfigError(
            f"{str(p)!r} has no finite {metric!r} (got {value!r}): the run must validate at its last"
            " step (it does unless --trainer.limit_val_batches is 0)."
        )
    provenance = {
        "summary": str(p),
        "beta": run_beta(p.parent),
        "metric": metric,
        "optimizer_steps": summary.get("optimizer_steps"),
        "weights_sha256": summary.get("weights_sha256"),
    }
    return float(value), provenance


def run_beta(run_dir: Path) -> float | None:
    """The DPO ``beta`` in the ``config.yaml`` LightningCLI saved next to a run's summary (None if absent)."""
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        return None
    import yaml

    beta = ((yaml.safe_load(cfg.read_text()) or {}).get("model") or {}).get("beta")
    return float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None


def optimum_from_summaries(
    sft_summary: str | os.PathLike, dpo_summary: str | os.PathLike, beta: float | None = None, prefix: str = "val"
) -> Optimum:
    """An :class:`Optimum` from the ``summary.json`` files of an SFT-only and a DPO-only run (their held-out
    losses; ``prefix="held_in"``: their losses on the held-in sample of training rows)."""
    f_sft, src_sft = read_summary(sft_summary, "sft", prefix)
    f_dpo, src_dpo = read_summary(dpo_summary, "dpo", prefix)
    steps = (src_sft["optimizer_steps"], src_dpo["optimizer_steps"])
    if None not in steps and steps[0] != steps[1]:
        raise ConfigError(
            f"the SFT-only run made {steps[0]} optimizer steps and the DPO-only run {steps[1]}: measure both"
            " optima with the same budget (the same --trainer.max_steps)."
        )
    if beta is None:
        beta = src_dpo["beta"]
    return Optimum(f_sft, f_dpo, beta, source="summaries", sources={"sft": src_sft, "dpo": src_dpo})


def optimum_k_from_summaries(summaries: Mapping[str, str | os.PathLike], beta: float | None = None) -> OptimumK:
    """An :class:`OptimumK` from the ``summary.json`` of a ``Single(objective=name)`` run per name.

    The runs must have made the same number of optimizer steps. ``beta`` (None: from the runs' saved configs) is
    recorded only when a preference data set was measured: a run of one logs ``val/{name}_rewards_accuracies``.
    """
    if not summaries:
        raise ConfigError("no data sets to measure: give one Single run's summary.json per data set.")
    stars: dict[str, float] = {}
    sources: dict[str, Any] = {}
    for name, path in summaries.items():
        stars[name], sources[name] = read_summary(path, name)
        summary = json.loads(Path(path).read_text())
        sources[name]["preference"] = f"val/{name}_rewards_accuracies" in summary
    steps = {name: src["optimizer_steps"] for name, src in sources.items() if src["optimizer_steps"] is not None}
    if len(set(steps.values())) > 1:
        made = ", ".join(f"{name} {n}" for name, n in steps.items())
        raise ConfigError(
            f"the single-objective runs made different numbers of optimizer steps ({made}): measure every"
            " optimum with the same budget (the same --trainer.max_steps)."
        )
    preference = [name for name, src in sources.items() if src["preference"]]
    if not preference:
        beta = None
    elif beta is None:
        betas = {sources[name]["beta"] for name in preference} - {None}
        if len(betas) > 1:
            raise ConfigError(f"the preference data sets' runs used different DPO betas {sorted(betas)}.")
        beta = betas.pop() if betas else None
    return OptimumK(stars, beta, source="summaries", sources=sources)
