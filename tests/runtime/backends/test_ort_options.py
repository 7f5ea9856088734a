"""The ONNX Runtime sessions sdtrt creates: their threads do not spin-wait after a run (torch work follows)."""

from __future__ import annotations

import pytest
import torch

from sdtrt.export.manifest import read_manifest
from sdtrt.runtime.backends.ort_backend import OrtBackend

SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _options(workdir, **kwargs):
    backend = OrtBackend(workdir, read_manifest(workdir), torch.device("cpu"), threads=2, **kwargs)
    return backend.runner("text_encoder").session.get_session_options()


def test_cpu_sessions_do_not_spin(sd1_workdir_fp32):
    opts = _options(sd1_workdir_fp32)
    assert [opts.get_session_config_entry(k) for k in SPIN_KEYS] == ["0", "0"]
    assert opts.intra_op_num_threads == 2


@pytest.mark.parametrize("spin, value", [(True, "1"), (False, "0")])
def test_spinning_only_when_asked(sd1_workdir_fp32, spin, value):
    opts = _options(sd1_workdir_fp32, allow_spinning=spin)
    assert [opts.get_session_config_entry(k) for k in SPIN_KEYS] == [value, value]
