"""``resnetlab train``: every TrainConfig field is a flag; ``--config FILE`` and ``--resume RUN``."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..training import config as cfg
from .common import DefaultsFormatter, add_json_flag


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (default: resnet20 on the bundled digits)",
        description=(
            "Train a registered model on digits, CIFAR-10/100, synthetic data or an image folder. "
            "Settings come from the defaults, then --config FILE (TOML, keys as below with _), then "
            "the flags. The run folder gets config.toml, metrics.jsonl, checkpoints/, result.json and "
            "curves.png."
        ),
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (see configs/)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN with its saved settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or step log lines")
    add_json_flag(p)
    cfg.add_config_flags(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> dict | None:
    from ..training.distributed import env_dist_info
    from ..training.engine import train

    if args.resume:
        extra = cfg.given_flags(args) + (["--config"] if args.config else [])
        if extra:
            raise UserError(f"--resume continues {args.resume} with its saved settings; drop {', '.join(extra)}")
        result = train(resume=args.resume, progress=not args.no_progress)
    else:
        result = train(cfg.config_from_args(args), progress=not args.no_progress)
    if not env_dist_info().is_main:
        return None  # under torchrun the other ranks trained the same model; rank 0 reports it
    final = result.final
    if not args.json:
        val = f"{final['val_acc']:.2f}%" if final.get("val_acc") is not None else "n/a"
        print(
            f"done: validation accuracy {val} after {final.get('epoch', 0)} epochs, "
            f"{result.wall_seconds:.0f}s; run folder {result.run_dir}"
        )
    return result.to_dict()
