"""Shared fixtures. Checkpoints made here are read-only for tests: copy one (``shutil.copytree``) to modify it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny-sd1 diffusers folder (seed 0), made once per session."""
    from sdtrt.checkpoint.random_init import init_random

    return init_random(tmp_path_factory.mktemp("ckpt") / "tiny-sd1", "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny-sd2 diffusers folder (seed 0, v-prediction), made once per session."""
    from sdtrt.checkpoint.random_init import init_random

    return init_random(tmp_path_factory.mktemp("ckpt") / "tiny-sd2", "tiny-sd2", seed=0)


def _export(ckpt_dir: Path, workdir: Path, precision: str) -> Path:
    from sdtrt.checkpoint.loader import load_checkpoint
    from sdtrt.export.pipeline import export_checkpoint
    from sdtrt.export.spec import ExportSpec

    export_checkpoint(load_checkpoint(ckpt_dir), workdir, ExportSpec(precision=precision), progress=False)
    return workdir


@pytest.fixture(scope="session")
def sd1_workdir_fp32(tiny_sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd1 exported in fp32 (all four components), made once per session; read-only for tests."""
    return _export(tiny_sd1_dir, tmp_path_factory.mktemp("wd") / "sd1-fp32", "fp32")


@pytest.fixture(scope="session")
def sd1_workdir_fp16(tiny_sd1_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd1 exported in fp16, made once per session; read-only for tests."""
    return _export(tiny_sd1_dir, tmp_path_factory.mktemp("wd") / "sd1-fp16", "fp16")


@pytest.fixture(scope="session")
def sd2_workdir_fp32(tiny_sd2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd2 (v-prediction) exported in fp32, made once per session; read-only for tests."""
    return _export(tiny_sd2_dir, tmp_path_factory.mktemp("wd") / "sd2-fp32", "fp32")


@pytest.fixture(scope="session")
def sd2_workdir_fp16(tiny_sd2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd2 (v-prediction) exported in fp16, made once per session; read-only for tests."""
    return _export(tiny_sd2_dir, tmp_path_factory.mktemp("wd") / "sd2-fp16", "fp16")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny-sdxl diffusers folder (seed 0: two text encoders, text_time conditioning)."""
    from sdtrt.checkpoint.random_init import init_random

    return init_random(tmp_path_factory.mktemp("ckpt") / "tiny-sdxl", "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny-sdxl-refiner diffusers folder (seed 0: text_encoder_2 only, aesthetic score)."""
    from sdtrt.checkpoint.random_init import init_random

    return init_random(tmp_path_factory.mktemp("ckpt") / "tiny-sdxl-refiner", "tiny-sdxl-refiner", seed=0)


@pytest.fixture(scope="session")
def sdxl_workdir_fp32(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl exported in fp32 (every component), made once per session; read-only for tests."""
    return _export(tiny_sdxl_dir, tmp_path_factory.mktemp("wd") / "sdxl-fp32", "fp32")


@pytest.fixture(scope="session")
def sdxl_workdir_fp16(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl exported in fp16 (the VAE in fp32, SDXL's default), made once per session; read-only for tests."""
    return _export(tiny_sdxl_dir, tmp_path_factory.mktemp("wd") / "sdxl-fp16", "fp16")


@pytest.fixture(scope="session")
def sdxl_refiner_workdir_fp32(tiny_sdxl_refiner_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sdxl-refiner exported in fp32, made once per session; read-only for tests."""
    return _export(tiny_sdxl_refiner_dir, tmp_path_factory.mktemp("wd") / "sdxl-refiner-fp32", "fp32")
