"""One click in the web: train, score and mine, each step skipped once it is done."""
from __future__ import annotations

from app.db import session_scope
from app.models import MiningRun, TrainedModel
from worker.context import JobContext
from worker.handlers.mine import run_mine
from worker.handlers.score import run_score
from worker.handlers.train import run_train


def run_pipeline(context: JobContext) -> dict:
    job = context.job
    with session_scope(context.settings) as session:
        model = session.get(TrainedModel, job.model_id)
        run = session.get(MiningRun, job.run_id)
        trained, scored = model.status == "ready", "score" in (run.stages_done or [])
    result: dict = {"model": job.model_id, "run": job.run_id}
    if not trained:
        result.update(run_train(context))
    if not scored:
        result.update(run_score(context))
    result.update(run_mine(context))
    return result
