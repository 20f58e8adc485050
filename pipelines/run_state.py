"""Where a run stands in its output folder, so that launching it again continues instead of starting over.

A run folder holds the resolved recipe (``recipe.yaml``), and per stage ``stages/<name>/`` with the Trainer's
``checkpoint-N`` folders and, once the stage has finished, ``done.json``. A checkpoint counts only when complete:
the Trainer writes ``trainer_state.json`` last, so a process killed while saving leaves a folder without it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

RECIPE_FILE = "recipe.yaml"
DONE_FILE = "done.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys that change how a run is watched or saved, not what it computes: they may differ between the runs of a resume.
RESUME_NEUTRAL_KEYS = {
    "report_to", "logging_steps", "save_steps", "save_total_limit", "disable_tqdm", "dataloader_num_workers",
    "resume", "eval_math", "eval_safety", "eval_batch_size", "eval_max_new_tokens", "run_name",
    "log_level", "push_to_hub", "hub_model_id",
}


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT.match(path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def stage_done(stage_dir: str | Path) -> dict | None:
    path = Path(stage_dir) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def mark_stage_done(stage_dir: str | Path, summary: dict) -> None:
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    (Path(stage_dir) / DONE_FILE).write_text(json.dumps(summary, indent=2))


def recipe_differences(saved: dict, current: dict) -> list[str]:
    keys = (set(saved) | set(current)) - RESUME_NEUTRAL_KEYS
    return [f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in sorted(keys)
            if saved.get(k) != current.get(k)]


def prepare_run_dir(run_dir: str | Path, recipe: dict, resume: bool, header: str = "") -> bool:
    """Make ``run_dir`` ready; True when it holds a run of the same recipe to continue.

    A folder with a run of another recipe is an error (it names the differences); ``resume: false`` clears the
    previous run's stages and starts over."""
    run_dir = Path(run_dir)
    saved_path = run_dir / RECIPE_FILE
    previous = (run_dir / "stages").is_dir()
    if previous and not resume:
        shutil.rmtree(run_dir / "stages")
        for name in ("metrics.jsonl", "eval.json"):
            (run_dir / name).unlink(missing_ok=True)
        previous = False
    if previous and saved_path.is_file():
        differences = recipe_differences(yaml.safe_load(saved_path.read_text()) or {}, recipe)
        if differences:
            raise RuntimeError(
                f"{run_dir} holds a run of a different recipe ({'; '.join(differences)}). To continue it, run its "
                f"own {saved_path}; to start over there, pass --resume false; or pass another --output_dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return previous
