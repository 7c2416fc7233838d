"""Scratch buffers: reused by name up to their kept size, fresh beyond it."""

from __future__ import annotations

import torch

from mipic_kernels import scratch


def test_a_name_reuses_its_buffer_and_grows_when_asked_for_more():
    s = scratch.Scratch()
    a = s.take("x", (3, 4), torch.float32, torch.device("cpu"))
    b = s.take("x", (2, 5), torch.float32, torch.device("cpu"))
    assert b.shape == (2, 5) and b.is_contiguous() and b.data_ptr() == a.data_ptr()
    assert s.take("y", (3, 4), torch.float32, torch.device("cpu")).data_ptr() != a.data_ptr()
    bigger = s.take("x", (5, 5), torch.float32, torch.device("cpu"))
    assert bigger.shape == (5, 5) and s.take("x", (3, 4), torch.float32, torch.device("cpu")).data_ptr() == bigger.data_ptr()
    as_double = s.take("x", (3, 4), torch.float64, torch.device("cpu"))
    assert as_double.dtype == torch.float64


def test_buffers_beyond_the_kept_size_are_not_kept():
    s = scratch.Scratch()
    shape = (scratch.KEEP_BYTES // 4 + 1,)
    first = s.take("x", shape, torch.float32, torch.device("cpu"))
    second = s.take("x", shape, torch.float32, torch.device("cpu"))
    assert first.shape == shape and first.data_ptr() != second.data_ptr()
