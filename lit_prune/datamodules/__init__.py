"""Lightning data modules that turn text files, datasets and instruction data into token batches."""

from lit_prune.datamodules.base import TokenDataModule
from lit_prune.datamodules.instruction import InstructionDataModule
from lit_prune.datamodules.text import TextDataModule

__all__ = ["InstructionDataModule", "TextDataModule", "TokenDataModule"]
