"""Jobs over whole datasets: the shared loop (``loop``), what every job shares around it (``common``), and one
module per kind of job: ``run`` (generation), ``score`` (log-likelihood) and ``embed`` (embedding vectors)."""
from .embed import EmbedJobConfig, embed_job
from .run import JobConfig, run_job
from .score import ScoreJobConfig, score_job

__all__ = ["EmbedJobConfig", "JobConfig", "ScoreJobConfig", "embed_job", "run_job", "score_job"]
