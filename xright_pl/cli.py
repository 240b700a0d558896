"""``python -m xright_pl fit|validate --config ...``: LightningCLI over the module and the data module."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from xright_pl.callbacks import RunSummary
from xright_pl.data.module import JointDataModule
from xright_pl.module import XRightModule


class XRightCLI(LightningCLI):
    """LightningCLI with the library's defaults (a run summary at the end of ``fit``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunSummary, "summary")


def main(args: list[str] | None = None) -> XRightCLI:
    return XRightCLI(
        XRightModule,
        JointDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Joint SFT + DPO post-training (ALRIGHT, MAXRIGHT, Sequential, Mix)."},
    )


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
