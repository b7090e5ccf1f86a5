"""`numexp summary`: per-layer output shapes, parameters and MACs, checked against the state dict and a hand count."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numexp import models, summary

# every model on an input it fits, and the data set giving that input
CASES = [("simplenet", (3, 32, 32), 43), ("simple_convnet", (3, 32, 32), 43), ("lenet5", (1, 28, 28), 10),
         ("mlp", (1, 8, 8), 10), ("softmax_regression", (3, 32, 32), 10), ("resnet_small", (3, 32, 32), 10)]


@pytest.mark.parametrize("name, in_shape, k", CASES)
def test_parameter_total_equals_the_parameters_in_the_state_dict(name, in_shape, k):
    model = models.build(name, in_shape=in_shape, num_classes=k)
    rows = summary.layer_rows(model)
    state = model.state_dict()
    buffer_keys = {key for key, _ in model.named_buffers()}
    params = sum(v.size for key, v in state.items() if key not in buffer_keys)
    assert sum(r.params for r in rows) == params == model.num_params()
    assert sum(r.params for r in rows) + summary.num_buffers(model) == sum(v.size for v in state.values())
    # each layer's own parameters are the state-dict entries under its dotted name
    for row in rows:
        own = sum(v.size for key, v in state.items() if key.rsplit(".", 1)[0] == row.name and key not in buffer_keys)
        assert row.params == own, row.name


@pytest.mark.parametrize("name, in_shape, k", CASES)
def test_last_output_shape_is_the_shape_of_a_forward_pass(name, in_shape, k):
    model = models.build(name, in_shape=in_shape, num_classes=k).eval()
    rows = summary.layer_rows(model)
    assert rows[-1].output_shape == (k,)
    # top-level layers' shapes agree with the model's own layer table
    table = {n: shape for n, _, shape in model.layer_table()}
    for row in rows:
        if row.name in table:
            assert row.output_shape == tuple(table[row.name])
    assert model(np.zeros((2, *in_shape), dtype=np.float32)).shape == (2, k)


def test_simplenet_macs_on_3x32x32_match_a_hand_count():
    model = models.build("simplenet", in_shape=(3, 32, 32), num_classes=43)
    rows = {r.name: r for r in summary.layer_rows(model)}
    # conv: output positions x output channels x (input channels x 3 x 3); padding 1 keeps 32x32, pools halve it
    conv1 = 32 * 32 * 32 * (3 * 3 * 3)        # 884,736
    conv2 = 16 * 16 * 64 * (32 * 3 * 3)       # 4,718,592
    fc1 = (64 * 8 * 8) * 3072                  # 12,582,912
    fc2 = 3072 * 43                            # 132,096
    assert (rows["conv1"].macs, rows["conv2"].macs, rows["fc1"].macs, rows["fc2"].macs) == (conv1, conv2, fc1, fc2)
    assert sum(r.macs for r in rows.values()) == conv1 + conv2 + fc1 + fc2 == 18_318_336
    assert rows["conv1"].output_shape == (32, 32, 32) and rows["pool2"].output_shape == (64, 8, 8)
    assert rows["flatten"].output_shape == (4096,)
    assert all(rows[n].macs == 0 for n in ("bn1", "relu1", "pool1", "flatten", "relu3"))


def test_residual_blocks_list_their_layers_with_dotted_names_and_the_shortcut_on_the_block_input():
    model = models.build("resnet_small", in_shape=(3, 32, 32), num_classes=10)
    rows = {r.name: r for r in summary.layer_rows(model)}
    assert rows["layer2.conv1"].output_shape == (32, 16, 16)
    assert rows["layer2.downsample.0"].type == "Conv2d" and rows["layer2.downsample.0"].output_shape == (32, 16, 16)
    # the 1x1 projection reads the 16-channel block input: 16 x 16 x 32 positions x 16 inputs
    assert rows["layer2.downsample.0"].macs == 16 * 16 * 32 * 16
    prefixes = {key.rsplit(".", 1)[0] for key in model.state_dict()}
    assert prefixes <= set(rows)


def test_layer_summary_text_has_a_row_per_layer_and_totals():
    model = models.build("simplenet", in_shape=(3, 32, 32), num_classes=43)
    text = summary.layer_summary(model)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "output", "shape", "params", "MACs"]
    assert any(line.split()[:2] == ["conv1", "Conv2d"] and line.endswith("884,736") for line in lines)
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "12,737,611", "18,318,336"]
    assert "192 buffer values" in text


def test_input_shape_comes_from_the_data_config_without_loading_data(compose_cfg):
    for overrides, expected in [(["data=gtsrb"], ((3, 32, 32), 43)), (["data=digits"], ((1, 8, 8), 10)),
                                (["data=mnist"], ((1, 28, 28), 10)),
                                (["data=cifar10", "data.size=24"], ((3, 24, 24), 10)),
                                (["data=digits", "data.size=28"], ((1, 28, 28), 10))]:
        assert summary.input_spec(compose_cfg(overrides).data) == expected
    with pytest.raises(summary.SummaryError, match="data.size=N"):
        summary.input_spec(compose_cfg(["data=gtsrb", "data.size=null"]).data)


def test_cli_prints_the_table_and_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "numexp.summary", "model=simplenet", "data=gtsrb"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("simplenet on data=gtsrb: input (3, 32, 32), 43 classes")
    assert "12,737,611" in proc.stdout and "18,318,336" in proc.stdout
    script = Path(sys.executable).with_name("numexp")
    proc = subprocess.run([str(script), "summary", "model=lenet5", "data=digits"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert "model=lenet5 does not fit data=digits" in line and "data.size" in line
