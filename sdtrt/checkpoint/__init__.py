"""Checkpoint loading, offline only: diffusers folders and single-file (CompVis / A1111) checkpoints."""

from sdtrt.checkpoint.archs import KNOWN_ARCHS, ArchSpec, arch_spec
from sdtrt.checkpoint.loader import load_checkpoint
from sdtrt.checkpoint.model import Checkpoint
from sdtrt.checkpoint.random_init import init_random

__all__ = ["KNOWN_ARCHS", "ArchSpec", "Checkpoint", "arch_spec", "init_random", "load_checkpoint"]
