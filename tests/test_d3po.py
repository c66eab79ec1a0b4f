"""D3PO: the per-step DPO maths, Pareto pairing, "it trains" (tiny SD3, toy2d), and labels files (good and bad)."""

import json
import math

import pytest
import torch
from conftest import untrained_lora_parameters

from flowalign import labeling
from flowalign.config import ConfigError, load_config
from flowalign.functional.d3po import clamped_log_ratio, d3po_loss, pareto_compare, preference_pairs
from flowalign.trainers.d3po import D3POConfig, train_d3po


# ----------------------------------------------------------------------------- maths
def test_clamped_log_ratio_is_the_log_of_the_clamped_ratio():
    lp = torch.tensor([-1.0, -1.0, -1.0, 5.0, -200.0], requires_grad=True)
    ref = torch.tensor([-1.05, -0.5, -1.5, -300.0, 0.0])  # inside, below, above, exp would overflow, underflow
    got = clamped_log_ratio(lp, ref, eps=0.1)
    with torch.no_grad():
        literal = torch.log(torch.clamp(torch.exp((lp[:3] - ref[:3]).double()), 0.9, 1.1)).float()
    torch.testing.assert_close(got[:3], literal)
    assert got[3].item() == pytest.approx(math.log(1.1)) and got[4].item() == pytest.approx(math.log(0.9))
    got.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))  # no pull once clamped


def test_d3po_loss_matches_a_hand_computation():
    beta, eps = 0.1, 0.1
    lp_w = torch.tensor([-1.0, -3.0], requires_grad=True)
    lp_l = torch.tensor([-2.0, -3.0], requires_grad=True)
    ref_w = torch.tensor([-1.05, -3.0])   # pair 0: rho_w = e^0.05 (inside the clamp)
    ref_l = torch.tensor([-1.5, -3.02])   # pair 0: rho_l = e^-0.5 -> clamped to 0.9; pair 1: rho_l = e^0.02
    loss, info = d3po_loss(lp_w, lp_l, ref_w, ref_l, beta, eps)
    m0, m1 = 0.05 - math.log(0.9), 0.0 - 0.02
    expected = (-math.log(1 / (1 + math.exp(-beta * m0))) - math.log(1 / (1 + math.exp(-beta * m1)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert info["accuracy"].item() == 0.5 and info["margin"].item() == pytest.approx((m0 + m1) / 2, rel=1e-4)
    assert info["clip_frac"].item() == pytest.approx(0.25)  # one ratio of four is outside [0.9, 1.1]
    loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # d/d lp_w of -log sigmoid(beta m) / P = -beta sigmoid(-beta m) / P; the clamped rho_l gets no gradient
    torch.testing.assert_close(lp_w.grad, torch.tensor([-beta * sig(-beta * m0) / 2, -beta * sig(-beta * m1) / 2]))
    torch.testing.assert_close(lp_l.grad, torch.tensor([0.0, beta * sig(-beta * m1) / 2]))


def test_d3po_accuracy_reads_the_unclamped_ratios():
    # both ratios above the clamp: the loss sees a tie (margin 0), the policy still prefers w (log-ratio 0.5 > 0.3)
    lp_w, lp_l, ref = torch.tensor([0.5, 0.3]), torch.tensor([0.3, 0.5]), torch.zeros(2)
    loss, info = d3po_loss(lp_w, lp_l, ref, ref, beta=0.1, eps=0.1)
    assert info["margin"].item() == 0 and info["clip_frac"].item() == 1
    assert info["accuracy"].item() == 0.5  # pair 0 prefers w, pair 1 prefers l


def test_d3po_loss_at_the_reference_and_with_weights():
    lp = torch.randn(4, requires_grad=True)
    loss, info = d3po_loss(lp[:2], lp[2:], lp[:2].detach(), lp[2:].detach(), beta=0.1, eps=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and info["ratio_dev"] == 0
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-0.025, -0.025, 0.025, 0.025]))  # -+beta/2 per pair / 2
    # a zero-weight (padding) pair contributes nothing
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([-0.05, 3.0])
    w_loss, _ = d3po_loss(a, b, a * 0, b * 0, 0.1, 0.1, weight=torch.tensor([1.0, 0.0]))
    one, _ = d3po_loss(a[:1], b[:1], a[:1] * 0, b[:1] * 0, 0.1, 0.1)
    assert w_loss.item() == pytest.approx(one.item())
    with pytest.raises(ValueError, match="eps"):
        clamped_log_ratio(a, b, eps=1.5)


def test_pareto_compare_follows_d3po():
    a = torch.tensor([[30.0, 10.0, 6.0], [1.0, 1.0, 1.0], [30.0, 10.0, 6.0], [1.0, 2.0, 3.0]])
    b = torch.tensor([[20.0, 8.0, 5.0], [1.0, 1.0, 1.0], [40.0, 4.0, 4.0], [1.0, 2.0, 3.5]])
    # dominates / identical / each better somewhere / equal but one worse
    assert pareto_compare(a, b).tolist() == [1, 0, 0, -1]
    assert pareto_compare(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.0, 3.0, 2.0])).tolist() == [1, -1, 0]


def test_preference_pairs_within_groups_skip_ties():
    r = torch.tensor([0.1, 0.5, 0.3, 7.0, 7.0, 2.0])
    g = torch.tensor([4, 4, 4, 9, 9, 1])  # a group of 3, a group of 2 (a tie), a singleton
    w, l = preference_pairs(r, g)
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 0), (1, 2), (2, 0)]
    # several rewards: only dominating pairs survive
    r2 = torch.tensor([[1.0, 1.0], [2.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    w, l = preference_pairs(r2, torch.zeros(4, dtype=torch.long))
    assert sorted(zip(w.tolist(), l.tolist())) == [(0, 3), (1, 3), (2, 0), (2, 1), (2, 3)]
    with pytest.raises(ValueError, match="rows"):
        preference_pairs(r, g[:3])


def test_config_validation():
    for bad, key in [({"group_size": 1}, "group_size"), ({"eps": 0.0}, "eps"), ({"beta": -1.0}, "beta"),
                     ({"labels": "x", "rewards": ["a", "b"]}, "rewards"), ({"rewards": ["a", "a"]}, "rewards")]:
        with pytest.raises(ConfigError, match=key):
            load_config(D3POConfig, bad)
    with pytest.raises(ConfigError, match="sampler"):
        load_config(D3POConfig, {"sampler": "ode"})
    for bad in ({"num_steps": 4, "sde_window_size": 5}, {"labels": "x", "sde_window_size": 3}):
        with pytest.raises(ConfigError, match="sde_window_size"):
            load_config(D3POConfig, bad)
    assert load_config(D3POConfig, {}).group_size == 2


# ----------------------------------------------------------------------------- it trains
def _tiny(tmp_path, **kw):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    base = {"task": "d3po", "model": "tiny-sd3", "reward": "jpeg-compressibility", "prompts": str(tmp_path / "p.txt"),
            "eval_prompts": None, "epochs": 2, "groups_per_epoch": 2, "group_size": 2, "num_steps": 3,
            "rollout_batch_size": 4, "train_batch_size": 4, "lora_rank": 4, "out": str(tmp_path / "run"),
            "progress": False, "log_with": "none", "lr": 1e-2}
    return load_config(D3POConfig, {**base, **kw})


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_reward_preferences_train_every_lora_parameter_from_shared_noise(tmp_path, monkeypatch):
    import flowalign as fa

    shared = []
    orig = fa.sample

    def spy(*a, **k):
        traj = orig(*a, **k)
        k_ = k.get("num_images_per_prompt", 1)
        x = traj.latents[:, 0].reshape(-1, k_, *traj.latents.shape[2:])
        shared.append(bool((x == x[:, :1]).all()) and not torch.equal(traj.x0[0], traj.x0[1]))
        return traj

    monkeypatch.setattr(fa, "sample", spy)
    cfg = _tiny(tmp_path)
    _, unchanged = untrained_lora_parameters(lambda: train_d3po(cfg, model=fa.load_model("tiny-sd3")))
    assert not unchanged, f"parameters that did not train: {unchanged[:5]}"
    assert shared and all(shared)  # each prompt's samples start from one noise and still differ
    rec = _metrics(tmp_path)
    # one pair per prompt, unless the two JPEG sizes tie (the epoch-1 draw does: a skipped pair)
    assert [r["train/pairs"] for r in rec] == [1, 2] and all(math.isfinite(r["train/loss"]) for r in rec)
    assert rec[0]["train/first_ratio_dev"] < 1e-5  # the first step is at the reference: ratio 1
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_an_sde_window_makes_pairs_branch_only_there_and_trains_only_its_steps(tmp_path, monkeypatch):
    import flowalign as fa
    from flowalign.sampling import sampler

    seen, trained = [], []
    orig_sample, orig_log_prob = fa.sample, sampler.log_prob

    def spy_sample(*a, **k):
        traj = orig_sample(*a, **k)
        x = traj.latents[:, 1].reshape(-1, 2, *traj.latents.shape[2:])  # after step 0, the window
        seen.append((traj.stochastic.nonzero().flatten().tolist(), bool((x[:, 0] != x[:, 1]).any())))
        return traj

    def spy_log_prob(model, traj, steps=None, **k):
        trained.extend(steps)
        return orig_log_prob(model, traj, steps=steps, **k)

    monkeypatch.setattr(fa, "sample", spy_sample)
    monkeypatch.setattr(sampler, "log_prob", spy_log_prob)
    cfg = _tiny(tmp_path, sde_window_size=1, sde_window_range=0.1)
    train_d3po(cfg, model=fa.load_model("tiny-sd3"))
    assert seen and all(steps == [0] and branched for steps, branched in seen)  # one stochastic step, at 0
    assert trained and set(trained) == {0}


def test_opposed_rewards_give_no_pareto_pair_and_no_update(tmp_path):
    import flowalign as fa

    cfg = _tiny(tmp_path, rewards=["jpeg-compressibility", "jpeg-incompressibility"], epochs=1)
    run, unchanged = untrained_lora_parameters(lambda: train_d3po(cfg, model=fa.load_model("tiny-sd3")))
    assert run.step == 0 and len(unchanged) == len(run.params) - 2  # nothing trained (the helper leaves out a
    # LoRA pair that never gets a gradient)
    rec = _metrics(tmp_path)[0]
    assert rec["train/pairs"] == 0 and "reward/jpeg-incompressibility" in rec


def test_short_toy2d_run_raises_the_preferred_reward(tmp_path):
    cfg = load_config(D3POConfig, {"task": "d3po", "model": "toy2d", "reward": "toy2d-linear",
                                   "prompts": "toy2d:8gaussians", "eval_prompts": None, "epochs": 16,
                                   "groups_per_epoch": 4, "group_size": 8, "num_steps": 8, "rollout_batch_size": 64,
                                   "train_batch_size": 64, "lora_rank": 8, "lr": 1e-3, "out": str(tmp_path / "run"),
                                   "save_every": 0, "progress": False, "log_with": "none"})
    train_d3po(cfg)
    r = [rec["reward/mean"] for rec in _metrics(tmp_path)]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last > first + 0.5, r  # measured: about 0.13 -> 1.4 (toy2d-linear is the height y)


# ----------------------------------------------------------------------------- labels files
MANIFEST = {"version": 1, "n": 2, "prompts": ["a red circle", "a blue square", "a red circle", "two green triangles"]}


def _folder(tmp_path, lines: str):
    (tmp_path / "set").mkdir(exist_ok=True)
    (tmp_path / "set" / "manifest.json").write_text(json.dumps(MANIFEST))
    (tmp_path / "set" / "labels.jsonl").write_text(lines)
    return tmp_path / "set"


def test_labels_parse_choices_scores_and_overrides(tmp_path):
    folder = _folder(tmp_path, '{"prompt_index": 0, "choice": 1, "time": "t"}\n\n'
                               '{"prompt": "a blue square", "choice": null}\n'
                               '{"prompt_index": 3, "prompt": "two green triangles", "scores": [2, 1]}\n'
                               '{"prompt_index": 0, "choice": 0}\n')
    labels = labeling.read_labels(folder / "labels.jsonl", MANIFEST)
    assert sorted(labels) == [0, 1, 3] and labels[0]["choice"] == 0 and labels[1]["scores"] is None
    assert labeling.label_pairs(labels) == [(0, 0, 1), (3, 0, 1)]  # the later line for prompt 0 wins
    data = labeling.load_labelled(folder)
    assert data.prompt_indices == [0, 3] and data.winners.tolist() == [0, 2] and data.losers.tolist() == [1, 3]


@pytest.mark.parametrize("lines,match", [
    ('{"prompt_index": 0, "choice": 1}\n{"prompt_index": 1, "choice": 1\n{"prompt_index": 3, "choice": 0}\n',
     r"labels.jsonl:2: not valid JSON"),
    ('{"prompt_index": 0, "choice": 1}\n{"prompt_index": 1, "choice": 0}\n{"prompt_ind',
     r"labels.jsonl:3: the last line is incomplete"),
    ('{"prompt": "a purple hexagon", "choice": 0}\n', r"labels.jsonl:1: unknown prompt 'a purple hexagon'"),
    ('{"prompt_index": 1, "prompt": "a red circle", "choice": 0}\n', r"labels.jsonl:1: unknown prompt .* prompt 1 is"),
    ('{"prompt": "a red circle", "choice": 0}\n', r"labels.jsonl:1: .*occurs 2 times"),
    ('\n{"prompt_index": 4, "choice": 0}\n', r"labels.jsonl:2: prompt_index 4 is out of range"),
    ('{"prompt_index": 0, "choice": 2}\n', r"labels.jsonl:1: choice 2 is out of range"),
    ('{"prompt_index": 0, "choice": true}\n', r"labels.jsonl:1: \"choice\" must be"),
    ('{"prompt_index": 0, "scores": [1, 2, 3]}\n', r"labels.jsonl:1: \"scores\" must be a list of 2"),
    ('{"prompt_index": 0}\n', r"labels.jsonl:1: give exactly one of"),
    ('[0, 1]\n', r"labels.jsonl:1: expected a JSON object"),
    ('{"prompt_index": 0, "choice": null}\n', r"holds no preference"),
])
def test_bad_labels_files_name_the_file_and_line(tmp_path, lines, match):
    folder = _folder(tmp_path, lines)
    with pytest.raises(labeling.LabelsError, match=match) as e:
        labeling.load_labelled(folder / "labels.jsonl")
    assert str(folder / "labels.jsonl") in str(e.value)


def test_missing_folder_or_manifest_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared labelling folder"):
        labeling.load_labelled(tmp_path)
    folder = _folder(tmp_path, "")
    (folder / "labels.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="flowalign label"):
        labeling.load_labelled(folder)


def test_the_trainer_stops_on_a_bad_labels_file_before_training(tmp_path, capsys):
    from flowalign.cli import main

    folder = _folder(tmp_path, '{"prompt_index": 0, "choice": 1}\n{"prompt_index": 9, "choice": 0}\n')
    cfg = tmp_path / "d3po.yaml"
    cfg.write_text(f"task: d3po\nmodel: tiny-sd3\nreward: jpeg-compressibility\neval_prompts: null\n"
                   f"labels: {folder}\nout: {tmp_path / 'run'}\nprogress: false\nlog_with: none\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'labels.jsonl'}:2: prompt_index 9 is out of range" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_server_store_recovers_a_cut_short_line_and_only_appends(tmp_path):
    good = '{"prompt_index": 0, "choice": 1}\n{"prompt_index": 1, "choice": 0}\n'
    folder = _folder(tmp_path, good + '{"prompt_index": 2, "cho')
    store = labeling.LabelStore(folder)
    assert "line 3 was cut short" in store.recovered
    assert (folder / "labels.jsonl").read_text() == good
    assert (folder / "labels.jsonl.partial").read_text() == '{"prompt_index": 2, "cho\n'
    assert sorted(store.labels) == [0, 1] and store.next_unlabelled() == 2
    state = store.add({"prompt_index": 2, "choice": 0})
    text = (folder / "labels.jsonl").read_text()
    assert text.startswith(good) and text.count("\n") == 3 and state["next"] == 3
    with pytest.raises(labeling.LabelsError, match="out of range"):
        store.add({"prompt_index": 2, "choice": 5})
    assert (folder / "labels.jsonl").read_text() == text  # a rejected label writes nothing
    # a complete last line that only lacks its newline is kept
    (folder / "labels.jsonl").write_text(text + '{"prompt_index": 3, "choice": 1}')
    store = labeling.LabelStore(folder)
    assert "completed" in store.recovered and store.next_unlabelled() is None
    # a bad line in the middle stops the server instead of appending after it
    (folder / "labels.jsonl").write_text('{"prompt_index": 0, "choice": 1}\nnot json\n')
    with pytest.raises(labeling.LabelsError, match="labels.jsonl:2"):
        labeling.LabelStore(folder)


def test_label_command_prepares_once_and_explains_bad_folders(tmp_path, capsys):
    from flowalign.cli import main

    (tmp_path / "p.txt").write_text("a red circle\na blue square\nthree green triangles\n")
    folder = tmp_path / "pairs"
    argv = ["label", str(folder), "--prepare", "--model", "tiny-sd3", "--prompts", str(tmp_path / "p.txt"),
            "--num-prompts", "2", "--n", "3", "--steps", "2"]
    assert main(argv) == 0
    manifest = labeling.read_manifest(folder)
    assert manifest["prompts"] == ["a red circle", "a blue square"] and manifest["n"] == 3
    assert manifest["sampler"] == "flow-sde" and manifest["num_steps"] == 2
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"0000{i}-{k}.png" for i in range(2)
                                                                     for k in range(3)]
    saved = torch.load(folder / "trajectories" / "00001.pt")
    assert saved["latents"].shape[:2] == (3, 3) and saved["log_probs"].shape == (3, 2)
    assert torch.equal(saved["latents"][:, 0], saved["latents"][:1, 0].expand_as(saved["latents"][:, 0]))
    (folder / "labels.jsonl").write_text('{"prompt_index": 0, "choice": 2}\n')
    assert main(argv) == 2 and "already holds a prepared set" in capsys.readouterr().err
    assert (folder / "labels.jsonl").read_text() == '{"prompt_index": 0, "choice": 2}\n'
    assert main(["label", str(tmp_path / "nowhere")]) == 2
    assert "not a prepared labelling folder" in capsys.readouterr().err


def test_labels_from_another_model_are_refused(tmp_path):
    import flowalign as fa

    folder = labeling.prepare(tmp_path / "pairs", model="tiny-sd3", prompts=["a red circle", "a blue square"],
                              num_steps=2, progress=False)
    (folder / "labels.jsonl").write_text('{"prompt_index": 0, "choice": 1}\n{"prompt_index": 1, "choice": 0}\n')
    cfg = load_config(D3POConfig, {"model": "tiny-sd3", "reward": "jpeg-compressibility", "eval_prompts": None,
                                   "labels": str(folder / "labels.jsonl"), "epochs": 1, "lora_rank": 4,
                                   "out": str(tmp_path / "run"), "progress": False, "log_with": "none"})
    other = fa.load_model("tiny-sd3")
    with torch.no_grad():
        for p in other.transformer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ConfigError, match="do not come from this model"):
        train_d3po(cfg, model=other)
    summary = train_d3po(cfg, model=fa.load_model("tiny-sd3"))  # the model that sampled them is accepted
    assert summary == {} and (tmp_path / "run" / "lora").exists()
