"""`fssd` starts at once: its parser, `--help`, the data stages and the error paths load neither
torch nor Ray nor MLflow (the heavy imports happen where they are used). No timing is asserted;
bench/ measures speed."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "ray", "mlflow")

# Runs the CLI in-process (as the console script does) and prints the heavy modules it loaded.
_RUN = (
    "import sys\n"
    "from pipeline.cli import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    rc = e.code\n"
    "print('LOADED', sorted(m for m in {heavy!r} if m in sys.modules), 'RC', rc)\n"
).format(heavy=HEAVY)


def _loaded(cwd, *args):
    r = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("LOADED")]
    assert line, (r.stdout[-2000:], r.stderr[-2000:])
    return line[-1], r


@pytest.mark.parametrize("args", [
    ["--help"],
    ["download", "--help"],
    ["train", "--help"],
    ["convert"],                 # no params.yaml here: the error path
    ["train"],                   # likewise
    ["detect", "x.jpg", "--model", "nope.pt"],
], ids=lambda a: " ".join(a))
def test_cli_loads_no_framework(tmp_path, args):
    line, r = _loaded(tmp_path, *args)
    assert line.startswith("LOADED []"), (line, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_data_stages_load_no_torch(tmp_path, make_params):
    """download and convert of the default synthetic set (tiny) never load torch."""
    p = make_params(tmp_path / "params.yaml", tmp_path / "data", tmp_path, **{"data.synthetic.num_images": 30})
    for stage in ("download", "convert"):
        line, r = _loaded(tmp_path, stage, "--params", str(p), "--metrics-out", str(tmp_path / f"{stage}.json"))
        assert line == "LOADED [] RC 0", (stage, line, r.stderr[-2000:])
    assert (tmp_path / "data" / "processed" / "train.json").is_file()
