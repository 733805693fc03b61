"""``python -m training --config training/configs/<method>.toml [section.key=value ...]`` (also under
``accelerate launch -m training ...``): load and validate the config, then train, resume or just print it."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from training.schema import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a one-step SR method into an adapter bundle the ComfyUI nodes load.",
        epilog="Example: python -m training --config training/configs/osediff.toml model.base=/models/sd21-base "
               "data.hq_dir=/data/hq train.output_dir=runs/osediff",
    )
    parser.add_argument("--config", required=True, help="a TOML config, e.g. training/configs/osediff.toml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="settings that replace the file's, as TOML values (train.max_steps=1000)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in train.output_dir, or from CHECKPOINT")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.config import load_config
    from training.toml_write import dumps

    overrides = list(args.overrides) + ([f"train.resume={json.dumps(args.resume)}"] if args.resume is not None else [])
    log = logging.getLogger("training")
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            sys.stdout.write(dumps(config.to_dict()))
            return 0
        from training.trainer import Trainer

        bundle = Trainer(config).run()
    except (ConfigError, FileNotFoundError) as err:  # a setting or a path to fix; the message says which
        log.error("%s", err)
        return 2
    except ValueError as err:  # an input that does not fit (a bundle, an image); the message says what to change
        log.error("%s (run with --log-level DEBUG for the traceback)", err)
        log.debug("traceback", exc_info=True)
        return 2
    if bundle is not None:
        log.info("done: %s", bundle)
    return 0
