"""Checkpoint loading, offline only: diffusers folders and single-file (CompVis / A1111) checkpoints."""

from sdtrt.checkpoint.archs import KNOWN_ARCHS, ArchSpec, arch_spec
from sdtrt.checkpoint.model import Checkpoint

__all__ = ["KNOWN_ARCHS", "ArchSpec", "Checkpoint", "arch_spec"]
