"""The CKA-map benchmark: honest baselines (each provider computes the same map as
MinibatchCKA, up to pytorch-cka's clamping) and the command end to end."""

from __future__ import annotations

import csv

import pytest
import torch

from benchmarks import cka_map as bench
from tests.seeding import SESSION_SEED

SMALL = bench.Workload("small", "test shapes", 3, 4, (9, 13, 11), 7)
SMALL_SELF = bench.Workload("small-self", "test shapes", 4, None, (10, 12), 5)


def _batches(workload: bench.Workload) -> list[tuple]:
    return bench.make_features(workload, seed=SESSION_SEED % 2**31, dtype=torch.float64)


@pytest.mark.parametrize("workload", [SMALL, SMALL_SELF], ids=lambda w: w.name)
def test_pair_loop_computes_the_minibatch_map(workload):
    batches = _batches(workload)
    want = bench.mipic_map(batches)
    # float64 on both sides: the published formula against U-centring, ~1e-13 apart.
    torch.testing.assert_close(bench.pair_loop_map(batches), want, rtol=1e-9, atol=1e-11)


def test_expanded_reference_computes_the_one_minibatch_map():
    batches = _batches(SMALL)[:1]
    torch.testing.assert_close(bench.expanded_map(batches), bench.mipic_map(batches), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("workload", [SMALL, SMALL_SELF], ids=lambda w: w.name)
def test_pytorch_cka_computes_the_same_map_where_it_does_not_clamp(workload):
    pytest.importorskip("cka")
    batches = _batches(workload)
    want = bench.mipic_map(batches)
    got = bench.pytorch_cka_map(batches).double()
    inside = (want > 0) & (want < 1)
    # Its sums are float32 whatever the features (as in the package): 1e-6.
    torch.testing.assert_close(got[inside], want[inside], rtol=1e-6, atol=1e-7)
    assert torch.equal(got[want <= 0], torch.zeros_like(got[want <= 0]))


def test_run_workload_rows_and_agreement():
    rows = bench.run_workload(SMALL, ["mipic", "pair-loop", "expanded"], repeats=2, seed=SESSION_SEED % 2**31)
    assert [r["provider"] for r in rows] == ["mipic", "pair-loop"]  # expanded: one-minibatch workloads only
    for row in rows:
        assert float(row["p20_ms"]) <= float(row["p50_ms"]) <= float(row["p80_ms"])
        assert float(row["max_err"]) < 1e-5 and row["off_1e-3"] == "0"
        assert row["x_pytorch_cka"] == "nan"


def test_command_appends_to_its_csv(tmp_path, capsys):
    out = tmp_path / "cka_map.csv"
    for _ in range(2):
        assert bench.main(["--workload", "map-512", "--provider", "mipic", "--repeats", "1", "--csv", str(out)]) == 0
    assert "map-512" in capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and tuple(rows[0]) == bench.SCHEMA
    assert rows[0]["device"].startswith("cpu") and rows[0]["workload"] == "map-512"
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="does not have the header"):
        bench.main(["--workload", "map-512", "--provider", "mipic", "--repeats", "1", "--csv", str(tmp_path / "other.csv")])
