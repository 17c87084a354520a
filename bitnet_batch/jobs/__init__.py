"""Jobs over whole datasets: the shared loop (``loop``), what every job shares around it (``common``), and one
module per kind of job: ``run`` (generation) and ``score`` (log-likelihood)."""
from .run import JobConfig, run_job
from .score import ScoreJobConfig, score_job

__all__ = ["JobConfig", "ScoreJobConfig", "run_job", "score_job"]
