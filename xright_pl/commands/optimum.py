"""``python -m xright_pl optimum``: measure f_sft* and f_dpo* with two single-objective fits (or read them from
finished runs' ``summary.json``) and write the optimum file that MAXRIGHT and the gap metrics read.

A command: it runs fits through :mod:`xright_pl.cli`, so it lives above everything it uses, and nothing in the
library imports it (the value type and its file format are :mod:`xright_pl.optimum`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xright_pl.assets import resolve
from xright_pl.callbacks import RunSummary
from xright_pl.errors import ConfigError
from xright_pl.optimum import DEFAULT_CONFIG, SINGLE, Optimum, optimum_from_summaries, write_optimum


def _fit_single(config: str, objective: str, root: Path, overrides: list[str]) -> tuple[Path, float]:
    """Run ``fit`` from ``config`` with ``xright_pl.Single(objective)`` in ``root``; the summary path and beta."""
    from xright_pl.cli import run  # the command line runs this command too: imported when a fit is needed

    path = resolve(config)
    if not Path(path).is_file():
        raise ConfigError(
            f"{objective}_config {config!r} not found (relative paths are relative to the working directory"
            f" {os.getcwd()!r}). Give a config file, or leave --{objective}_config out for the packaged demo config"
            f" {DEFAULT_CONFIG[objective]!r}."
        )
    selector = json.dumps({"class_path": "xright_pl.Single", "init_args": {"objective": objective}})
    args = ["fit", "--config", path, f"--model.selector={selector}", f"--trainer.default_root_dir={root}"]
    args += [a if a.startswith("--") else f"--{a}" for a in overrides]
    cli = run(args)
    summary = next(c for c in cli.trainer.callbacks if isinstance(c, RunSummary)).summary
    if "path" not in summary:
        raise RuntimeError(f"the {objective}-only run wrote no summary.json")
    return Path(summary["path"]), float(cli.model.beta)


def optimum(
    out: str = "optimum.json",
    sft_config: str | None = DEFAULT_CONFIG["sft"],
    dpo_config: str | None = DEFAULT_CONFIG["dpo"],
    sft_summary: str | None = None,
    dpo_summary: str | None = None,
    overrides: list[str] | None = None,
    workdir: str = "runs/optimum",
) -> dict[str, Any]:
    """Measure the optima f_sft* and f_dpo* and write them to a JSON file for MAXRIGHT and the gap metrics.

    For each objective: if its ``*_summary`` is given, read the final validation loss from that
    ``summary.json`` (it must be a single-objective run); else run ``fit`` from its ``*_config`` with the
    selector set to ``xright_pl.Single`` for that objective, in ``workdir``. Use the same model, data, seed
    and number of steps as the joint runs that will use the file. The values are the module's validation
    losses, i.e. exactly the training normalisation.

    Args:
        out: JSON file to write (``{"f_sft_star", "f_dpo_star", "beta", "sources"}``).
        sft_config: config of the SFT-only fit (any config: its selector is replaced). The default is the
            packaged copy of the repository's ``configs/demo/sft_only.yaml`` (``builtin:`` assets work from
            any working directory).
        dpo_config: config of the DPO-only fit (any config: its selector is replaced); default: the packaged
            ``configs/demo/dpo_only.yaml``.
        sft_summary: summary.json of a finished SFT-only run (instead of running sft_config).
        dpo_summary: summary.json of a finished DPO-only run (instead of running dpo_config).
        overrides: options applied to both fits, e.g. ``[trainer.max_steps=300, model.seed=1]``.
        workdir: folder of the fits' logs (``<workdir>/sft_only``, ``<workdir>/dpo_only``).

    Returns:
        The written content, with ``path``.
    """
    overrides = list(overrides or [])
    paths: dict[str, Path] = {}
    betas: dict[str, float] = {}
    configs = {"sft": sft_config, "dpo": dpo_config}
    given = {"sft": sft_summary, "dpo": dpo_summary}
    for objective in ("sft", "dpo"):
        if given[objective] is not None:
            paths[objective] = Path(given[objective])
        elif configs[objective] is not None:
            root = Path(workdir) / SINGLE[objective]
            paths[objective], betas[objective] = _fit_single(configs[objective], objective, root, overrides)
        else:
            raise ConfigError(f"give --{objective}_config or --{objective}_summary to measure f_{objective}*.")
    found = optimum_from_summaries(paths["sft"], paths["dpo"], betas.get("dpo"))
    beta = found.beta
    sources = dict(found.sources)
    for objective in ("sft", "dpo"):
        if configs[objective] is not None and given[objective] is None:
            sources[objective] = {**sources[objective], "config": configs[objective], "overrides": overrides}
    result = Optimum(found.f_sft, found.f_dpo, beta, source=out, sources=sources)
    path = write_optimum(result, out)
    print(f"f_sft* = {result.f_sft:.6g}, f_dpo* = {result.f_dpo:.6g} (beta={beta}) written to {path}", flush=True)
    return {**result.as_dict(), "path": str(path)}
