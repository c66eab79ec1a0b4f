import json

import pytest
import torch

from flowalign.cli import build_parser, main


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ["sample", "demo", "models"]:
        assert cmd in out
    for cmd in ["sample", "demo", "models"]:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: flowalign " + cmd in capsys.readouterr().out
    # every option of `sample` carries a help string
    sub = build_parser()._subparsers._group_actions[0].choices["sample"]
    assert all(a.help for a in sub._actions)


def test_sample_writes_images_and_settings(tmp_path):
    out = tmp_path / "s"
    rc = main(["sample", "--model", "tiny-sd3", "--prompt", "a red circle", "--prompt", "two blue squares",
               "--steps", "3", "--sampler", "flow-sde", "--eta", "0.5", "--cfg", "3", "--seed", "1", "--out", str(out)])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["grid.png", "sample_000.png", "sample_001.png", "settings.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampler"] == "flow-sde" and settings["eta"] == 0.5 and settings["guidance_scale"] == 3
    assert settings["num_steps"] == 3 and len(settings["log_probs"]) == 2


def test_sample_video_and_overrides(tmp_path):
    out = tmp_path / "v"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-wan\nnum_steps: 5\nprompts: [a red circle]\n")
    assert main(["sample", "--config", str(cfg), "--out", str(out), "num_steps=2"]) == 0
    assert (out / "sample_000.gif").exists()
    assert json.loads((out / "settings.json").read_text())["num_steps"] == 2


def test_sample_video_streaming(tmp_path):
    out = tmp_path / "s"
    assert main(["sample", "--model", "tiny-wan", "--prompt", "a red circle", "--stream-chunks", "3", "--steps", "2",
                 "--out", str(out), "stream_chunk_frames=2", "stream_window=2", "stream_sinks=1"]) == 0
    settings = json.loads((out / "settings.json").read_text())["streaming"]
    # 3 chunks of 2 latent frames = 6 latent frames = (6 - 1) * 4 + 1 = 21 frames with tiny-wan's 4x in time
    assert settings["chunks"] == 3 and settings["frames"] == 21 and settings["sinks"] == 1
    assert (out / "sample_000.gif").exists() and (out / "grid.gif").exists()


@pytest.mark.parametrize("argv,msg", [
    (["sample", "--model", "tiny-sd3", "--prompt", "x", "--stream-chunks", "2"], "needs a video model"),
    (["sample", "--model", "tiny-wan", "--prompt", "x", "--stream-chunks", "0"], "stream_chunks"),
    (["sample", "--model", "tiny-sd3"], "No prompts"),
    (["sample", "--prompt", "x", "--sampler", "euler"], "sampler"),
    (["sample", "--prompt", "x", "--eta", "-1"], "eta"),
    (["sample", "--prompt", "x", "--height", "30"], "multiple"),
    (["sample", "--prompt", "x", "nmu_steps=3"], "num_steps"),
    (["sample", "--prompt", "x", "--model", "nope"], "Unknown model"),
])
def test_bad_input_gives_a_clear_error(tmp_path, capsys, argv, msg):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert msg in capsys.readouterr().err


def test_demo_runs(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--per-category", "1"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["samplers"]) == {"ode", "flow-sde", "dance-sde", "cps"}
    assert summary["samplers"]["flow-sde"]["on_policy_max_abs_ratio_minus_1"] < 1e-5
    assert 0 <= summary["samplers"]["ode"]["verifier_accuracy"]["overall"] <= 1
    assert (tmp_path / "demo" / "cps.png").exists()


def test_sample_with_reward_guidance(tmp_path):
    import json as _json

    out = tmp_path / "g"
    base = tmp_path / "b"
    argv = ["sample", "--model", "toy2d", "--prompt", "gaussian", "--num-images-per-prompt", "64", "--steps", "8"]
    assert main([*argv, "--out", str(base)]) == 0
    assert main([*argv, "--guide", "toy2d-linear=1", "--guide-scale", "3", "--out", str(out)]) == 0
    pts = torch.tensor(_json.loads((out / "points.json").read_text())["points"])
    ref = torch.tensor(_json.loads((base / "points.json").read_text())["points"])
    # toy2d-linear rewards +y by default: guidance moves the samples up
    assert pts[:, 1].mean() > ref[:, 1].mean() + 0.2
    assert _json.loads((out / "settings.json").read_text())["guide"] == {"toy2d-linear": 1.0}
    assert main([*argv, "--guide", "toy2d-linear=x", "--out", str(out)]) == 2


def test_train_dispatches_on_the_task_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: tiny-sd3\n")
    assert main(["train", str(cfg)]) == 2
    assert "task" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", "--help-config", "reward-model"]) == 0
    assert "train_steps" in capsys.readouterr().out
