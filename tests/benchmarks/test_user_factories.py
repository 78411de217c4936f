"""A user's ``module:function`` model factory that returns anything but the network is refused in one
line by the harness's commands, as by ``guard train-dp``."""
from __future__ import annotations

from harness_cli import app as cli
from typer.testing import CliRunner


def test_guard_verify_refuses_a_factory_that_returns_a_tuple_in_one_line(tmp_path, monkeypatch):
    records = tmp_path / "records.jsonl"
    records.write_text('{"kind": "watermark", "client": "c", "time": 1.0, "features": [0.5], "label": 1, '
                       '"model_label": 0}\n')
    (tmp_path / "suspects.py").write_text("from torch import nn\n"
                                          "def pair():\n"
                                          "    return nn.Linear(1, 2), nn.CrossEntropyLoss()\n")
    (tmp_path / "weights.pt").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(cli, ["verify", "--records", str(records), "--model", "suspects:pair",
                                      "--weights", str(tmp_path / "weights.pt")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == ("guard verify: the model factory pair returned a tuple, not a torch.nn.Module: "
                                     "return the network itself")
