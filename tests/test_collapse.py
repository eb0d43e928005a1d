"""The paper's collapse ablation in miniature (Sec. 4.1, Fig. 2): without stop-gradient, collapse."""

import json

import pytest
from click.testing import CliRunner

from cli.main import simsiam

from conftest import make_image_folder


@pytest.fixture(scope="module")
def many_tiny_images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("collapse") / "images", classes=4, per_class=128, size=8)


def collapse_curve(images, out, *extra) -> list[float]:
    args = ["pretrain", images, "--out", out, "--preset", "cifar", "--no-cifar-stem", "--image-size", "8",
            "--dim", "64", "--pred-dim", "16", "--batch-size", "32", "--lr", "1.0", "--epochs", "12",
            "--workers", "0", "--device", "cpu", "--log-every", "8", "--save-every-epochs", "100", *extra]
    result = CliRunner().invoke(simsiam, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [l["collapse_std"] for l in lines if l["kind"] == "step"]


@pytest.mark.slow
def test_without_stop_gradient_the_outputs_collapse_and_with_it_they_do_not(tmp_path, many_tiny_images):
    # 512 images / 32 = 16 steps an epoch, 192 steps. The monitor is std(z/|z|) x sqrt(d):
    # about 1 for outputs spread over the sphere, 0 for a constant output.
    healthy = collapse_curve(many_tiny_images, tmp_path / "stop-grad")
    collapsed = collapse_curve(many_tiny_images, tmp_path / "no-stop-grad", "--no-stop-grad")
    assert len(healthy) == len(collapsed) == 24
    assert min(healthy[-6:]) > 0.5, healthy
    assert max(collapsed[-6:]) < 0.1, collapsed
    assert collapsed[0] > 0.5  # it starts healthy: the collapse is learned, not built in
