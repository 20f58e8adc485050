"""Where a run stands: complete checkpoints only, and no continuing a run of another recipe."""

import pytest

from pipelines.run_state import last_complete_checkpoint, prepare_run_dir, recipe_differences


def _checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")


@pytest.mark.parametrize("checkpoints, want", [
    ([], None),
    ([(4, True), (8, True)], "checkpoint-8"),
    ([(4, True), (8, True), (12, False)], "checkpoint-8"),  # killed while writing checkpoint-12
    ([(8, True), (10, True), (9, True)], "checkpoint-10"),  # by step, not by name
    ([(4, False)], None),
])
def test_last_complete_checkpoint(tmp_path, checkpoints, want):
    for step, complete in checkpoints:
        _checkpoint(tmp_path, step, complete)
    (tmp_path / "checkpoint-x").mkdir()
    got = last_complete_checkpoint(tmp_path)
    assert (got.name if got else None) == want


@pytest.mark.parametrize("saved, current, want", [
    ({"learning_rate": 1e-3}, {"learning_rate": 1e-3}, []),
    ({"learning_rate": 1e-3}, {"learning_rate": 5e-4}, ["learning_rate: 0.001 there, 0.0005 now"]),
    ({"report_to": ["tensorboard"], "save_steps": 10}, {"report_to": ["wandb"], "save_steps": 20}, []),
    ({}, {"max_steps": 5}, ["max_steps: None there, 5 now"]),
])
def test_recipe_differences_ignore_what_does_not_change_the_result(saved, current, want):
    assert recipe_differences(saved, current) == want


def test_prepare_run_dir(tmp_path):
    run = tmp_path / "run"
    assert prepare_run_dir(run, {"learning_rate": 1e-3}, resume=True) is False  # a new run
    (run / "stages" / "sft").mkdir(parents=True)
    assert prepare_run_dir(run, {"learning_rate": 1e-3}, resume=True) is True  # same recipe: continue
    with pytest.raises(RuntimeError, match=r"different recipe \(learning_rate: 0\.001 there, 0\.002 now\)"):
        prepare_run_dir(run, {"learning_rate": 2e-3}, resume=True)
    assert prepare_run_dir(run, {"learning_rate": 2e-3}, resume=False) is False  # start over
    assert not (run / "stages").exists()
