"""``python -m xright_pl optimum``: measure f_sft* and f_dpo* with two single-objective fits (or read them from
finished runs' ``summary.json``) and write the optimum file that MAXRIGHT and the gap metrics read; for a
config with ``data.datasets``, one ``Single(objective=name)`` fit per data set and a file of ``f_star`` by name.

A command: it runs fits through :mod:`xright_pl.commands.cli`, so it lives above everything it uses, and nothing in the
library imports it (the value type and its file format are :mod:`xright_pl.core.optimum`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xright_pl.callbacks.summary import RunSummary
from xright_pl.core.assets import resolve
from xright_pl.core.errors import ConfigError
from xright_pl.core.optimum import (
    DEFAULT_CONFIG,
    SINGLE,
    Optimum,
    OptimumK,
    optimum_from_summaries,
    optimum_k_from_summaries,
    write_optimum,
)


def _config_path(config: str, option: str, hint: str) -> str:
    """``config`` resolved (``builtin:`` assets), or a :class:`ConfigError` naming ``--option``."""
    path = resolve(config)
    if not Path(path).is_file():
        raise ConfigError(
            f"{option} {config!r} not found (relative paths are relative to the working directory"
            f" {os.getcwd()!r}). {hint}"
        )
    return path


def _fit_single(path: str, objective: str, root: Path, overrides: list[str]) -> tuple[Path, float]:
    """Run ``fit`` from the config file ``path`` with ``xright_pl.Single(objective)`` in ``root``; the summary path
    and beta."""
    from xright_pl.commands.cli import run  # the command line runs this command too: imported when a fit is needed

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
    datasets_config: str | None = None,
    summaries: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Measure the optima f_sft* and f_dpo* and write them to a JSON file for MAXRIGHT and the gap metrics.

    With ``datasets_config`` (a config with ``data.datasets``, e.g. ``configs/demo/three_objectives.yaml``)
    measure instead each data set's ``f_k*``: one fit with ``xright_pl.Single(objective=name)`` per data set, all
    from the same start and with the same budget, and write ``{"f_star": {name: f_k*}, "beta", "sources"}``
    (``sft_config``/``dpo_config`` are then not used).

    For each objective: if its ``*_summary`` is given, read the final validation loss from that
    ``summary.json`` (it must be a single-objective run); else run ``fit`` from its ``*_config`` with the
    selector set to ``xright_pl.Single`` for that objective, in ``workdir``. Use the same model, data, seed
    and number of steps as the joint runs that will use the file. The values are the module's validation
    losses, i.e. exactly the training normalisation.

    Args:
        out: JSON file to write (``{"f_sft_star", "f_dpo_star", "beta", "sources"}``; with
            ``datasets_config`` or ``summaries``: ``{"f_star": {name: value}, "beta", "sources"}``).
        sft_config: config of the SFT-only fit (any config: its selector is replaced). The default is the
            packaged copy of the repository's ``configs/demo/sft_only.yaml`` (``builtin:`` assets work from
            any working directory).
        dpo_config: config of the DPO-only fit (any config: its selector is replaced); default: the packaged
            ``configs/demo/dpo_only.yaml``.
        sft_summary: summary.json of a finished SFT-only run (instead of running sft_config).
        dpo_summary: summary.json of a finished DPO-only run (instead of running dpo_config).
        overrides: options applied to every fit, e.g. ``[trainer.max_steps=300, model.seed=1]``.
        workdir: folder of the fits' logs (``<workdir>/sft_only``, ``<workdir>/dpo_only``; with
            ``datasets_config``: ``<workdir>/<name>_only``).
        datasets_config: a config with ``data.datasets``: measure every data set's optimum (any selector in it
            is replaced by ``Single``).
        summaries: ``{name: summary.json}`` of finished ``Single(objective=name)`` runs, read instead of
            fitting those data sets (with ``datasets_config``, or alone for every data set).

    Returns:
        The written content, with ``path``.
    """
    overrides = list(overrides or [])
    if datasets_config is not None or summaries:
        if sft_summary is not None or dpo_summary is not None:
            raise ConfigError(
                "give --datasets_config/--summaries (named data sets) or --sft_summary/--dpo_summary (the pair),"
                " not both."
            )
        return _optimum_k(out, datasets_config, dict(summaries or {}), overrides, workdir)
    paths: dict[str, Path] = {}
    betas: dict[str, float] = {}
    configs = {"sft": sft_config, "dpo": dpo_config}
    given = {"sft": sft_summary, "dpo": dpo_summary}
    for objective in ("sft", "dpo"):
        if given[objective] is not None:
            paths[objective] = Path(given[objective])
        elif configs[objective] is not None:
            root = Path(workdir) / SINGLE[objective]
            hint = f"Give a config file, or leave --{objective}_config out for the packaged demo config"
            path = _config_path(configs[objective], f"{objective}_config", f"{hint} {DEFAULT_CONFIG[objective]!r}.")
            paths[objective], betas[objective] = _fit_single(path, objective, root, overrides)
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


def _option_value(overrides: list[str], key: str) -> tuple[bool, Any]:
    """Whether ``overrides`` set ``key`` (``key=value`` or ``--key=value``), and the last value (YAML)."""
    import yaml

    found, value = False, None
    for item in overrides:
        name, sep, text = item.removeprefix("--").partition("=")
        if sep and name == key:
            found, value = True, yaml.safe_load(text)
    return found, value


def dataset_names(config: str, path: str, overrides: list[str]) -> list[str]:
    """The names of the ``data.datasets`` of the config file ``path`` (given as ``config``), or of a
    ``data.datasets=...`` override."""
    import yaml

    found, datasets = _option_value(overrides, "data.datasets")
    if not found:
        datasets = ((yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}).get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(
            f"config {config!r} has no data.datasets: with named data sets give their config to --datasets_config;"
            " for the SFT/DPO pair use --sft_config and --dpo_config (or leave them out for the demo's)."
        )
    names = [d.get("name") if isinstance(d, dict) else None for d in datasets]
    if not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"config {config!r}: every entry of data.datasets needs a name, got {names}.")
    return names


def _optimum_k(
    out: str, config: str | None, summaries: dict[str, str], overrides: list[str], workdir: str
) -> dict[str, Any]:
    """The named data sets' optima: read ``summaries``, fit the others of ``config``, write ``out``."""
    path = None if config is None else _config_path(config, "datasets_config", "Give a config file with data.datasets.")
    names = dataset_names(config, path, overrides) if path is not None else list(summaries)
    unknown = [k for k in summaries if k not in names]
    if unknown:
        raise ConfigError(f"--summaries names {', '.join(unknown)}, not data sets of {config!r} ({', '.join(names)}).")
    paths: dict[str, Path] = {}
    betas: dict[str, float] = {}
    for name in names:
        if name in summaries:
            paths[name] = Path(summaries[name])
        else:
            paths[name], betas[name] = _fit_single(path, name, Path(workdir) / f"{name}_only", overrides)
    found = optimum_k_from_summaries(paths, next(iter(betas.values()), None))
    sources = {
        name: {**src, "config": config, "overrides": overrides} if name not in summaries else src
        for name, src in found.sources.items()
    }
    result = OptimumK(found.f_star, found.beta, source=out, sources=sources)
    written = write_optimum(result, out)
    stars = ", ".join(f"f_{k}* = {v:.6g}" for k, v in result.f_star.items())
    print(f"{stars} (beta={result.beta}) written to {written}", flush=True)
    return {**result.as_dict(), "path": str(written)}
