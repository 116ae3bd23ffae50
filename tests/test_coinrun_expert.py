"""The CoinRun environment, the planning expert and the labelling, on real Procgen (procgen2 0.10.7).

Nothing here is mocked: the tests play real CoinRun levels. They are skipped where Procgen is not installed; the
README's test command (and so CI) installs it, and tests/test_packaging.py checks that it does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math

import numpy as np
import pytest

from hardtovary.experiments.cli import main
from hardtovary.experiments.coinrun import expert, game, labelling, labels
from hardtovary.experiments.errors import UsageError

procgen = pytest.importorskip("procgen")

SMALL = expert.ExpertSettings(rollouts=2, depth=24, hold=4)


def test_numpy_stays_at_2_beside_procgen():
    """procgen2 and gym3 pin numpy<2 in their metadata; installed without their dependencies, NumPy stays at 2
    and Procgen still runs (the other tests play it)."""
    assert int(np.__version__.split(".")[0]) >= 2
    assert importlib.metadata.version(game.PACKAGE) == game.PACKAGE_VERSION


# ---- the environment -------------------------------------------------------------------------------------------


def _random_states(level: int, count: int, rng) -> list[bytes]:
    """States reached by running and jumping right for a random number of frames."""
    env = game.make_env(level)
    states = []
    for _ in range(count):
        for _ in range(int(rng.integers(1, 12))):
            env.act(np.array([rng.choice([5, 7, 8, 4])]))
        states.append(env.get_state()[0])
    return states


def _hold_each_action(state: bytes, frames: int = 8):
    """Every one of the 15 actions held ``frames`` frames from ``state``: (last frames [15, 64, 64, 3], states)."""
    env = game.make_env(0, game.NUM_ACTIONS)
    env.set_state([state] * game.NUM_ACTIONS)
    for _ in range(frames):
        env.act(np.arange(game.NUM_ACTIONS))
    _, observation, _ = env.observe()
    return observation["rgb"], env.get_state()


def test_restoring_a_state_replays_exactly():
    """The planner's premise: after set_state, the same actions give the same frames, rewards and resets."""
    env = game.make_env(7)
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.act(np.array([8]))
    saved = env.get_state()
    actions = rng.integers(0, game.NUM_ACTIONS, size=120)

    def play():
        out = []
        for a in actions:
            env.act(np.array([a]))
            reward, observation, first = env.observe()
            out.append((float(reward[0]), bool(first[0]), observation["rgb"].tobytes()))
        return out

    first_play = play()
    env.set_state(saved)
    assert play() == first_play


def test_the_six_keys_are_noop_and_down_is_a_near_duplicate():
    rng = np.random.default_rng(1)
    same_position, total, right_of_left, probed = 0, 0, 0, 0
    for level in (0, 3):
        for state in _random_states(level, 8, rng):
            frames, states = _hold_each_action(state)
            for key in range(9, 15):  # D, A, W, S, Q, E: exactly NOOP
                assert np.array_equal(frames[key], frames[4])
            where = np.array([game.positions(s)[:2] for s in states])
            for members in game.ACTION_CLASSES.values():
                total += len(members) - 1
                same_position += sum(np.allclose(where[m], where[members[0]]) for m in members[1:])
            # the classes differ: running right ends right of running left (unless a death restarted the level)
            right_of_left += where[7, 0] > where[1, 0]
            probed += 1
    assert same_position >= 0.9 * total
    assert right_of_left >= 0.8 * probed


def test_action_classes_partition_the_actions():
    members = sorted(a for group in game.ACTION_CLASSES.values() for a in group)
    assert members == list(range(game.NUM_ACTIONS))
    assert [game.ACTION_NAMES[a] for a in game.CLASS_ACTIONS] == list(game.CLASS_NAMES)
    probs = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
    spread = game.spread_over_actions(probs)
    assert spread.sum() == pytest.approx(1.0)
    assert spread[4] == pytest.approx(0.3 / 8) and spread[13] == pytest.approx(0.3 / 8)  # NOOP over 8 actions
    assert spread[8] == pytest.approx(0.1)  # RIGHT+UP alone
    np.testing.assert_allclose(game.class_probabilities(spread), probs)


def test_positions_follow_the_agent_and_find_the_coin():
    """Independent of the parser: holding RIGHT moves the agent right, LEFT moves it back; the coin's tile is
    where a greedy expert's reward of 10 arrives (the last position read, one frame before, is within a jump's
    frame of it, while the level starts 11 tiles away)."""
    env = game.make_env(3)
    start = game.positions(env.get_state()[0])
    for _ in range(12):
        env.act(np.array([7]))
    moved = game.positions(env.get_state()[0])
    assert moved.agent_x > start.agent_x + 1.0
    assert (moved.coin_x, moved.coin_y) == (start.coin_x, start.coin_y)
    for _ in range(12):
        env.act(np.array([1]))
    assert game.positions(env.get_state()[0]).agent_x < moved.agent_x - 1.0

    rng = np.random.default_rng(0)
    planner = expert.Planner(3, expert.ExpertSettings(rollouts=4, depth=48), rng)
    env = game.make_env(3)
    for _ in range(200):
        state = env.get_state()[0]
        last = game.positions(state)
        env.act(np.array([game.CLASS_ACTIONS[int(np.argmax(planner.class_values(state)))]]))
        reward, _, first = env.observe()
        if first[0]:
            break
    assert reward[0] == game.COIN_REWARD
    assert np.hypot(start.agent_x - start.coin_x, start.agent_y - start.coin_y) > 10
    assert np.hypot(last.agent_x - last.coin_x, last.agent_y - last.coin_y) < 2.5


def test_positions_refuses_what_is_not_a_coinrun_state():
    state = game.make_env(0).get_state()[0]
    for bad in (b"", state[:200], b"\x01" + state[1:], state.replace(b"coinrun", b"bigfish")):
        with pytest.raises(ValueError, match="does not read as a CoinRun state"):
            game.positions(bad)


# ---- the expert ------------------------------------------------------------------------------------------------


def test_soft_targets_are_a_softmax_of_the_class_values():
    values = np.array([0.0, 1.0, 2.0, 3.0, 9.0, 9.5])
    targets = expert.soft_targets(values, 0.5)
    by_hand = np.exp(values / 0.5) / np.exp(values / 0.5).sum()
    np.testing.assert_allclose(game.class_probabilities(targets), by_hand, rtol=1e-12)
    assert np.argmax(game.class_probabilities(expert.soft_targets(values, 1e-3))) == 5


def test_horizon_return_is_the_discounted_coin_at_full_speed():
    assert expert.horizon_return(2.5, 10, 0.9) == pytest.approx(10 * 0.9 ** (10 + 2.5 / expert.AGENT_SPEED))
    assert expert.horizon_return(-2.5, 10, 0.9) == expert.horizon_return(2.5, 10, 0.9)


def test_class_values_near_the_coin():
    """Close to the coin, the best class reaches it within a few frames (value near 10), running right beats
    running left by the frames it saves, every value lies in [0, 10], and the same seed gives the same values."""
    settings = expert.ExpertSettings(rollouts=4, depth=32)
    planner = expert.Planner(4, settings, np.random.default_rng(5))
    env = game.make_env(4)  # a short level: the coin 7 tiles to the right of the start
    for _ in range(60):
        state = env.get_state()[0]
        where = game.positions(state)
        if where.coin_x - where.agent_x < 2.0:
            break
        env.act(np.array([game.CLASS_ACTIONS[int(np.argmax(planner.class_values(state)))]]))
    values = planner.class_values(state)
    again = expert.Planner(4, settings, np.random.default_rng(5)).class_values(state)
    assert np.all((values >= 0) & (values <= game.COIN_REWARD))
    assert values.max() > game.COIN_REWARD * settings.gamma ** 12
    right, left = game.CLASS_NAMES.index("RIGHT"), game.CLASS_NAMES.index("LEFT")
    assert values[right] > values[left]
    np.testing.assert_array_equal(expert.Planner(4, settings, np.random.default_rng(5)).class_values(state), again)


@pytest.mark.slow
def test_greedy_expert_solves_most_levels():
    rng = np.random.default_rng(0)
    solved = []
    for level in range(100, 106):
        planner = expert.Planner(level, expert.ExpertSettings(), rng)
        env = game.make_env(level)
        frames, values = [], []
        solved.append(labelling._play_episode(env, planner, rng, 0.0, frames, values))
    assert sum(solved) >= 5


# ---- labelling -------------------------------------------------------------------------------------------------


def test_label_level_keeps_states_drawn_from_the_episodes():
    result = labelling.label_level(2, 15, SMALL, seed=3)
    assert result.frames.shape == (15, 64, 64, 3) and result.frames.dtype == np.uint8
    assert result.targets.shape == (15, game.NUM_ACTIONS)
    np.testing.assert_allclose(result.targets.sum(axis=1), 1.0, rtol=1e-6)
    for values, targets in zip(result.class_values, result.targets):
        np.testing.assert_allclose(targets, expert.soft_targets(values, SMALL.temperature), rtol=1e-6)
    assert result.episodes >= 1 and 0 <= result.solved <= result.episodes
    assert result.meta["decisions"] >= 15 and result.meta["version"] == game.PACKAGE_VERSION
    # distinct states: the frames are not all one frame
    assert len({f.tobytes() for f in result.frames}) > 5
    # drawn uniformly from every decision of every episode, not the first ones
    kept = np.array(result.meta["kept"])
    assert result.meta["decisions"] > 15
    assert np.all(np.diff(kept) > 0) and kept[-1] < result.meta["decisions"] and kept.tolist() != list(range(15))
    # the same seed labels the same states
    again = labelling.label_level(2, 15, SMALL, seed=3)
    np.testing.assert_array_equal(again.frames, result.frames)
    np.testing.assert_array_equal(again.targets, result.targets)


def test_one_test_state_comes_from_the_greedy_episode():
    result = labelling.label_level(1_000_003, 1, SMALL, seed=0)
    assert result.frames.shape[0] == 1 and result.episodes == 1


def _label(out, workers=1, **extra):
    return main(["coinrun", "label", "--train-levels", "0:2", "--test-levels", "500:502", "--states", "6",
                 "--rollouts", "2", "--depth", "16", "--workers", str(workers), "--out", str(out), "--no-progress",
                 *extra])


@pytest.mark.slow
def test_label_command_writes_resumes_and_does_not_depend_on_workers(tmp_path, capsys):
    assert _label(tmp_path / "a", workers=2) == 0
    printed = capsys.readouterr().out
    assert "greedy success" in printed and "train" in printed and "test" in printed
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["splits"]["train"]["levels"] == 2 and results["splits"]["test"]["levels"] == 2
    assert results["runtime"]["versions"]["procgen2"] == game.PACKAGE_VERSION
    first = {split: labels.load_split(tmp_path / "a", split) for split in labels.SPLITS}
    assert [lv.level for lv in first["train"]] == [0, 1] and [lv.level for lv in first["test"]] == [500, 501]

    # a killed run: one level file missing; the same command labels only that level, and identically
    missing = labels.level_path(tmp_path / "a", "train", 1)
    before = missing.stat().st_mtime_ns
    kept = labels.level_path(tmp_path / "a", "train", 0).stat().st_mtime_ns
    missing.unlink()
    assert _label(tmp_path / "a") == 0
    assert labels.level_path(tmp_path / "a", "train", 0).stat().st_mtime_ns == kept
    assert missing.stat().st_mtime_ns != before
    np.testing.assert_array_equal(labels.read_level(missing).frames, first["train"][1].frames)

    # one worker instead of two: the same labels
    assert _label(tmp_path / "b", workers=1) == 0
    for split in labels.SPLITS:
        for a, b in zip(first[split], labels.load_split(tmp_path / "b", split)):
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.targets, b.targets)

    # the whole chain on real frames: both methods train from this folder, and the mask is stepped
    pytest.importorskip("torch")
    assert main(["coinrun", "train", "--labels", str(tmp_path / "a"), "--out", str(tmp_path / "t"), "--epochs", "2",
                 "--batch-size", "3", "--width", "0.0625", "--seeds", "0", "--no-progress"]) == 0
    runs = json.loads((tmp_path / "t" / "results.json").read_text())["runs"]
    assert set(runs) == {"adam-seed0", "and_mask-seed0"}
    for key, run in runs.items():
        assert len(run["history"]) == 2
        for epoch in run["history"]:
            # finite, not small: after 4 steps the BatchNorm running statistics used in evaluation are still raw
            assert 0 <= epoch["test_kl"] < math.inf and 0 <= epoch["train_kl"] < math.inf
            # 4 steps an epoch: the first keeps nothing (tau 0.36 > 1 - beta3), later ones keep some
            assert (epoch["kept_fraction"] is None) == key.startswith("adam")
    assert 0 < runs["and_mask-seed0"]["history"][1]["kept_fraction"] <= 1
    if importlib.util.find_spec("matplotlib") is not None:  # the plots are optional ('hardtovary[plot]')
        assert {p.name for p in (tmp_path / "t").glob("*.png")} == {"fig18_kl_curves.png", "min_test_kl.png"}


def test_label_folder_of_another_procgen_version_is_refused(tmp_path, capsys):
    labels.open_folder(tmp_path, {"package": game.PACKAGE, "version": "0.10.4"})
    assert _label(tmp_path) == 2
    err = capsys.readouterr().err
    assert "rendered by procgen2 0.10.4" in err and err.count("\n") == 1


def test_label_folder_of_another_format_is_refused(tmp_path):
    (tmp_path / labels.CONFIG_FILE).write_text(json.dumps({"format": 0, "hardtovary": "0.0.1"}))
    with pytest.raises(UsageError, match="format 0"):
        labels.load_split(tmp_path, "train")


@pytest.mark.parametrize("argv, message", [
    (["--train-levels", "0:4", "--test-levels", "3:6"], "share 1 level"),
    (["--train-levels", "5"], "START:STOP"),
    (["--test-levels", "9:3"], "START < STOP"),
    (["--train-levels", "-1:3"], "START:STOP"),
    (["--states", "0"], "positive integer"),
    (["--gamma", "1.5"], "must lie in"),
    (["--temperature", "0"], "must be > 0"),
])
def test_bad_label_options_are_one_line_errors(tmp_path, capsys, argv, message):
    try:
        status = main(["coinrun", "label", "--out", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse's own errors: usage, then one line
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_procgen_says_how_to_install(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_procgen(name, *args, **kwargs):
        if name == "procgen" or name.startswith("procgen."):
            raise ImportError("No module named 'procgen'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_procgen)
    assert _label(tmp_path) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps procgen2==0.10.7" in err and err.count("\n") == 1
