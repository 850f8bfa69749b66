"""The ``train`` and ``eval`` command groups: each model kind adds its own subcommands
(:mod:`.rbm.commands`, :mod:`.spt.commands`, :mod:`.physformer.commands`). Importing this module
imports neither torch, scikit-learn nor matplotlib (the ``train`` extra); the handlers do, and
say which extra to install when they are missing. Handlers return an exit code.
"""

from __future__ import annotations

import argparse

from specserve.training.physformer import commands as physformer_commands
from specserve.training.rbm import commands as rbm_commands
from specserve.training.spt import commands as spt_commands

KINDS = (rbm_commands, spt_commands, physformer_commands)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train <kind>`` and ``eval <kind>`` for every model kind (handler in ``handler``)."""
    train = subparsers.add_parser("train", help="train a model (needs the 'train' extra)")
    train_sub = train.add_subparsers(dest="train_command", required=True)
    evaluate = subparsers.add_parser("eval", help="evaluate a trained model (needs the 'train' extra)")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True)
    for kind in KINDS:
        kind.register(train_sub, eval_sub)
