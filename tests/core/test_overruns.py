"""`metrics.overruns`: an emulated run's padded computes, per device, against their padding."""

from __future__ import annotations

import pandas as pd

from flowspec import metrics
from flowspec.records import ComputeRecord, to_frame


def compute(device: int, padded_ms: float, real_ms: float) -> ComputeRecord:
    return ComputeRecord(run_id="r", source="runtime", request_id=0, device=device, kind="tree", t_start_s=0.0,
                         model_ms=padded_ms / 2, padded_ms=padded_ms, real_ms=real_ms)  # fmt: skip


def test_a_compute_overruns_only_past_its_padding_plus_the_slack() -> None:
    frame = to_frame([compute(0, 10.0, 4.0), compute(0, 10.0, 10.9), compute(1, 20.0, 21.5), compute(1, 20.0, 5.0)],
                     ComputeRecord)  # fmt: skip
    table = metrics.overruns(frame, slack_ms=1.0)
    assert table.to_dict("records") == [
        {"device": 0, "n_computes": 2, "n_overruns": 0, "worst_excess_ms": 0.9000000000000004,
         "mean_real_over_padded": (0.4 + 1.09) / 2},
        {"device": 1, "n_computes": 2, "n_overruns": 1, "worst_excess_ms": 1.5, "mean_real_over_padded": (1.075 + 0.25) / 2},
    ]  # fmt: skip
    assert metrics.overruns(frame, slack_ms=0.0).n_overruns.tolist() == [1, 1]


def test_no_computes_give_an_empty_table_with_its_columns() -> None:
    table = metrics.overruns(to_frame([], ComputeRecord), slack_ms=1.0)
    assert table.empty and list(table.columns) == ["device", "n_computes", "n_overruns", "worst_excess_ms",
                                                    "mean_real_over_padded"]  # fmt: skip
    assert isinstance(table, pd.DataFrame)

