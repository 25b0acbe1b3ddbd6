"""The command line through its entry point: ``vtcompress.cli.main([...])`` and the installed ``vtcompress`` script."""

import subprocess
import sys
from pathlib import Path

import pytest

import vtcompress
from vtcompress.cli import main

SCRIPT = Path(sys.executable).parent / "vtcompress"


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vtcompress {vtcompress.__version__}"


def test_installed_script_runs():
    """One subprocess through the installed console script (the others call main() in-process)."""
    if not SCRIPT.is_file():
        pytest.skip(f"no installed script at {SCRIPT}")
    res = subprocess.run([str(SCRIPT), "testbed", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "sample" in res.stdout and "train-compressor" in res.stdout


def test_testbed_help_and_unknown_sub_command(capsys):
    """Regression (issue 13): ``vtcompress testbed --help`` answered "unknown sub-command '--help'"."""
    assert main(["testbed", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in ("train", "sample", "train-compressor", "card")) and "unknown" not in out
    assert main(["testbed", "trian"]) == 2
    assert "unknown sub-command 'trian'" in capsys.readouterr().err
    assert main(["testbed", "sample", "--help"]) == 0  # argparse's exit becomes an exit code
    assert "--out" in capsys.readouterr().out


def test_testbed_sample_writes_a_png(tmp_path, capsys):
    """Regression (issue 13): ``vtcompress testbed sample`` crashed (``sample_main`` did not exist)."""
    out = tmp_path / "s.png"
    assert main(["testbed", "sample", "--n", "2", "--split", "val", "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("[attribute] ") and " -> " in lines[0]
    assert main(["testbed", "sample", "--skill", "colour", "--out", str(out)]) == 2
    assert "valid: attribute" in capsys.readouterr().err


def test_testbed_train_returns_exit_code_zero(tmp_path):
    """Regression (issue 13): a full ``vtcompress testbed train`` ended in a TypeError (its dict passed to int())."""
    rc = main(["testbed", "train", "--out", str(tmp_path / "tb"), "--batch", "2", "--threads", "1", "--eval-n", "2",
               "--stages", "4", "--steps-s4", "1"])
    assert rc == 0
    assert (tmp_path / "tb" / "config.json").is_file()


def test_list_filters_and_the_matches_reference_column(capsys):
    assert main(["list", "--family", "attn"]) == 2
    err = capsys.readouterr().err
    assert "family='attn'" in err and "did you mean 'attention'" in err and "valid: transformation" in err
    assert main(["list", "--stage", "decodr"]) == 2
    assert "did you mean 'decoder'" in capsys.readouterr().err
    assert main(["list", "--family", "attention"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| method ") and "| matches reference " in out[0] and set(out[1]) <= {"|", "-"}
    rows = {line.split("|")[1].strip().strip("`"): line for line in out[2:]}
    assert {"fastv", "visionzip", "fastervlm"} <= set(rows) and "tome" not in rows


def test_unknown_command_suggests(capsys):
    assert main(["lst"]) == 2
    assert "did you mean 'list'" in capsys.readouterr().err


def test_show_on_an_own_image_uses_a_neutral_prompt(tmp_path, monkeypatch, capsys):
    """Regression (issue 13): ``vtcompress show PHOTO`` asked the testbed's "what colour is the circle ?" and fed it
    to text-guided methods; with ``--sample N`` the sample's own question is asked."""
    from PIL import Image

    import vtcompress.viz.cli as viz  # the module whose method_panels `vtcompress show` calls

    asked = []
    real = viz.method_panels

    def spy(loaded, image, methods, budget, question, *args, **kwargs):
        asked.append(question)
        return real(loaded, image, methods, budget, question, *args, **kwargs)

    monkeypatch.setattr(viz, "method_panels", spy)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(photo)
    out = tmp_path / "map.png"
    assert main(["show", str(photo), "--method", "uniform", "--model", "none", "--grid", "5x5", "--out", str(out)]) == 0
    assert out.is_file()
    assert asked[-1] == viz.DEFAULT_QUESTION and not any(w in asked[-1] for w in ("circle", "colour", "shape"))
    assert main(["show", str(photo), "--method", "uniform", "--model", "none", "--grid", "5x5", "--out", str(out),
                 "--question", "is the sky blue ?"]) == 0
    assert asked[-1] == "is the sky blue ?"
    from vtcompress.testbed.data import SKILLS, make_sample, sample_seed

    assert main(["show", "--sample", "2", "--method", "uniform", "--model", "none", "--out", str(out)]) == 0
    assert asked[-1] == make_sample(sample_seed("test", 2), SKILLS[2]).question
    capsys.readouterr()


def test_show_refuses_untrained_weights_unless_asked(tmp_path, capsys):
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (48, 48), (10, 200, 30)).save(photo)
    args = ["show", str(photo), "--method", "ldpv2", "--model", "none", "--grid", "6x6",
            "--out", str(tmp_path / "m.png")]
    assert main(args) == 2
    assert "has learned weights" in capsys.readouterr().err
    assert main([*args, "--param", "pretrained=False"]) == 0


def test_show_on_the_testbed_loads_the_shipped_checkpoint(tmp_path, monkeypatch):
    import vtcompress.viz.cli as viz  # the module whose method_panels `vtcompress show` calls

    seen = []
    real = viz.method_panels

    def spy(loaded, image, methods, *args, **kwargs):
        seen.append(methods)
        return real(loaded, image, methods, *args, **kwargs)

    monkeypatch.setattr(viz, "method_panels", spy)
    out = tmp_path / "m.png"
    assert main(["show", "--sample", "0", "--method", "qformer", "--budget", "0.25", "--out", str(out)]) == 0
    (m,) = seen[-1]
    assert isinstance(m, vtcompress.Compressor) and m.name == "qformer" and not m.untrained and m.budget == 0.25
    assert main(["show", "--sample", "0", "--method", "qformer", "--budget", "0.5", "--out", str(out)]) == 2
